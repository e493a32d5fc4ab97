"""Read and write QuPath projects, data files and objects."""
