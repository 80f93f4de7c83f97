"""APP: the ``gradguard`` command line, its demo and the lab of reproducible experiments."""
