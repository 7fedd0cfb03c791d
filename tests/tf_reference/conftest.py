# generate.py and generate_extra.py need TensorFlow and numpy, which neither the library nor
# its tests depend on: keep pytest (--doctest-modules) from importing them.
collect_ignore = ["generate.py", "generate_extra.py"]
