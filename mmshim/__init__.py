"""mmshim: checkpoint/restore for AWS Batch jobs on Spot, as an OCI runtime wrapping runc.

Kept empty but for the version: the runtime's passthrough path imports this package on every
containerd call, so nothing here may import anything.
"""

__version__ = "0.1.0"
