"""Several server worker processes behind one port: ``nacguard serve --workers N``.

:mod:`nacguard.supervisor.parent` is the supervisor (binds the port, starts, replaces and drains
the workers; it never imports torch or the web framework), :mod:`nacguard.supervisor.child` the
entry point of one worker (``python -m nacguard.supervisor.child``), which runs the same
draining uvicorn server as a single-process ``nacguard serve``.
"""

from nacguard.settings import Settings
from nacguard.supervisor.parent import Supervisor, supervise, worker_plan

__all__ = ["Supervisor", "serve", "worker_plan"]


def serve(settings: Settings) -> int:
    """``nacguard serve``: a supervisor of ``settings.worker_count`` workers, or with one worker
    the server itself in this process (:func:`nacguard.api.server.serve`); the exit status.

    The supervisor imports neither torch nor the web framework: only its workers do.
    """
    if settings.worker_count > 1:
        return supervise(settings)
    from nacguard.api.server import serve as serve_here

    return serve_here(settings)
