"""Speed figures of kdgrid, driven by `launch/bench.py`; nothing in `kd/` or `slurm/` imports
this package (imports go launch -> bench -> slurm -> kd).

common.py      what the figures were measured on, the device, medians, a row's class count
prepared.py    a row's training step prepared as `kd.train` prepares it, and synthetic batches
plain.py       the row's step as a plain-PyTorch loop doing the same arithmetic
step.py        the training step: the project's loop against the plain loop, teacher share, MFU
data.py        the data loader (and the test split's passes) against the step's demand
checkpoint.py  how long an epoch's checkpoint files keep training waiting
launch.py      validating, submitting and reading the status of an N-row grid on SLURM
local.py       the local executor: a row's process start to its first training step
"""
