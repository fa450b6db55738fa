"""Training: the loop, its configuration and its checkpoints (``train``), and SDE-Net's perturbed inputs
(``perturb``)."""
