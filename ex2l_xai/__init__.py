"""ex2l-xai: eXplaining to Learn (eX2L) on Captum, and an audit toolkit for spurious reliance."""

from ex2l_xai.errors import ConfigError, DataError, Ex2lError, TrainingError

__version__ = "0.1.0"
__all__ = ["ConfigError", "DataError", "Ex2lError", "TrainingError", "__version__"]
