"""The Evaluate and HellaSwag cells: the loss on held-out blocks, and HellaSwag's accuracy."""
