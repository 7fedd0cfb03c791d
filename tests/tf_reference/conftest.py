# generate.py needs TensorFlow and numpy, which neither the library nor its tests
# depend on: keep pytest (--doctest-modules) from importing it.
collect_ignore = ["generate.py"]
