"""everest-agent: attach a computing resource to the Everest platform."""

__version__ = "0.1.0"
