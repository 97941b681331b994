"""Everything that never runs while serving: dataset sources and synthetic OOD data, profile
build, OOD evaluation, checkpoint ranking (NAC-ME), the precision check, the literal reference
computation and the review export. The runtime packages never import this one."""
