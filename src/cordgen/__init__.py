"""cordgen: long chain-of-thought data by collaborative step-wise multi-teacher decoding."""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("cordgen")
except PackageNotFoundError:  # running from a source tree that was never installed
    __version__ = "0+unknown"
