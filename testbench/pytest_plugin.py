def pytest_addoption(parser):  # placeholder, filled by the matrix work
    pass
