"""everest-agent: attach a computing resource to the Everest platform."""

__version__ = "0.1.0"


def pythonpath(environ):
    """
    A C{PYTHONPATH} for a Python process the agent starts (its directory
    process; its pilots, whose nodes share its file system) that imports
    this very package, wherever it was imported from (an installed copy, a
    checkout on C{PYTHONPATH}), the rest of C{environ}'s own after it.
    """
    import os

    here = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    return os.pathsep.join(p for p in (here, environ.get("PYTHONPATH")) if p)
