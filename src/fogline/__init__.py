"""fogline: an edge computing stack for Python.

The public SDK for edge apps is re-exported here; everything else is internal.
"""

from fogline.app import App, Context, Message, NodeInfo, Request, Response

__version__ = "0.1.0"

__all__ = ["App", "Context", "Message", "NodeInfo", "Request", "Response", "__version__"]
