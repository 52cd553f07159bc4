"Test-suite settings: the `slow` marker (`pytest -m 'not slow'` runs the fast part in a few minutes; CI runs all)."

def pytest_configure(config):
    config.addinivalue_line('markers', "slow: trains models to a claimed accuracy, runs whole notebooks, a browser or several "
                                       "processes (minutes each); deselect with -m 'not slow'")
