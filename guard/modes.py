"""The guard's policy modes, the one list that the profile, the online policy and the CLI share.

``enforce`` rejects a suspect input, ``repair`` paints the located trigger over and classifies again
(rejecting what stays suspect), ``shadow`` answers as the model did and flags. A module of its own, with
no imports, so that the CLI can offer the choices without loading the profile or the model code.
"""

MODES = ("enforce", "repair", "shadow")

MEMORY_WATCH = ("suspects", "all", "off")
"""What the stateful trigger memory (:mod:`guard.online.memory`) watches: the queries assigned to the scan's
suspect labels (the default), every query, or none."""
