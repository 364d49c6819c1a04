"""Datapath backends. The reconcile loop knows only the ``Datapath`` protocol in ``base``."""
