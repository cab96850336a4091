"""Toy components, each defined and registered in its own file (CONTRIBUTING.md, Extending): importing a module
registers its toy, which the contract suites and tests/test_extending.py then run like a built-in one."""
