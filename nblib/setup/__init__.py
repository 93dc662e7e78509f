"""The Setup cell: the parameters and the configuration they resolve into, the hardware, the run's
folder and its lock."""
