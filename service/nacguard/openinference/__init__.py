"""The Open Inference Protocol (KServe v2) over REST and gRPC: an adapter beside ``api/``.

:mod:`~nacguard.openinference.rest` is an APIRouter the app mounts under ``/v2``;
:mod:`~nacguard.openinference.rpc` the gRPC server ``nacguard serve`` runs on ``grpc_port`` in
the same process and event loop. Both translate their wire forms (decoded in
:mod:`~nacguard.openinference.tensors`) to the calls of :mod:`~nacguard.openinference.protocol`,
which uses the one :class:`~nacguard.serving.Service`: ``/predict``'s admission, batcher,
limits, cache, metrics and drain. The package imports nothing at import time, so the API's error
handler can use its error mapping without loading the adapters.
"""
