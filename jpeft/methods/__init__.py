"""jpeft's methods, one file each, on the protocol in :mod:`jpeft.methods.base`.

A method registers itself with one :func:`~jpeft.methods.base.register_method` call in its own
file; ``jpeft/__init__.py`` imports the method modules (re-exporting their public config
classes), which is what registers them. See docs/ARCHITECTURE.md, "Adding a method".

The protocol modules here are :mod:`jpeft.methods.base` (the node protocol, :class:`Layout`,
the :class:`~jpeft.methods.base.Method` registry, frozen-state splitting) and
:mod:`jpeft.methods._common` (the shared layout dispatch). Every other module in this package
is a method module, which nothing outside ``jpeft/methods/`` (except ``jpeft/__init__.py``)
imports (the budget table over every method is :mod:`jpeft.budget`, a consumer).
"""
