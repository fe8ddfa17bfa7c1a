"""The project's exception hierarchy. Library code raises these; only ``edge.cli.main`` turns them into exit codes."""


class CytoEdgeError(Exception):
    """Base class for every expected error (bad input, bad bundle, bad config...)."""


class InputError(CytoEdgeError):
    """An input file, folder or value the user gave cannot be used."""


class BundleError(CytoEdgeError):
    """A model bundle is missing, altered, from another version, or inconsistent."""


class BackendError(CytoEdgeError):
    """An inference backend cannot be loaded or run (never silently replaced by another)."""


class ProtocolError(CytoEdgeError):
    """A ZeroMQ message does not follow the versioned frame/flags protocol."""


class ConfigError(CytoEdgeError):
    """A config file or option is invalid (unknown key, wrong type, bad value)."""


class CalibrationError(CytoEdgeError):
    """Calibration cannot be fitted or applied (too few cells, unknown classes...)."""
