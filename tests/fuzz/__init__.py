"""Coverage-guided fuzzing of the wire codec and the TURN core (see README.md).

Nothing is imported here: the fuzz driver must install its coverage instrumentation before
``turnserver`` is first imported.
"""
