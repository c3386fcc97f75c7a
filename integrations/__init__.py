"""tokenwire inside other frameworks; each subpackage imports its framework, installed by its extra."""
