"""The pytest plugin's parts; :mod:`corral.pytest_plugin` wires them to pytest's hooks.

Private: the public surface is the options, ini keys, fixtures and markers in
``docs/pytest.md``.
"""
