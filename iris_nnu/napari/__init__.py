"""The napari plugin of iris-nnu (`pip install -e ".[napari]"`): a reader of medical scans that keeps their geometry,
and the dock widget "Iris: segment from references" (napari.yaml lists the contributions).

Only this subpackage imports napari or Qt, and only in `widget`: `reader` and `segment` are plain Python (the glue the
widget runs, testable without a viewer), so `import iris_nnu` never needs the extra.
"""
