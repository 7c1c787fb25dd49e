"""Follow-up exams: registration, lesion matching and size change between two exams (``sap track``, SPEC §14)."""
