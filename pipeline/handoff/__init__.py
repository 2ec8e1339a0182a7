"""What leaves training: the bundle, registry (register/promote), pyfunc, predict and export."""
