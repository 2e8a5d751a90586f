"""The report: photo sheets, training curves and the threshold sweep."""
