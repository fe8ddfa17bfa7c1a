"""CytoEdge runtime: everything that runs on the box next to the microscope.

Never imports torch (tests/test_no_torch.py guards this).
"""
__version__ = "0.1.0"
