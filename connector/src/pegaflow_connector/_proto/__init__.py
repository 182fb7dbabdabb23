"""Generated engine API stubs (`make proto-python`); do not edit by hand."""
