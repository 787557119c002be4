"""Conformance kits for olmopt's plug-ins, shipped in the package so plug-in authors can run them."""
