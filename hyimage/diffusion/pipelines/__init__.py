"""The text-to-image pipeline and the refiner pipeline."""
