"""The Train cell: the loop, one optimizer step and its loss, OOM recovery, the processes and what
they agree on, stops, checkpoints and the resume contract."""
