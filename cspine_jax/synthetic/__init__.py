"""Synthetic RSNA 2022 format studies: anatomy, fractures, DICOM/NIfTI/CSV writers, the generator."""
from cspine_jax.synthetic.studies import generate, make_study, sample_study, test_labels, write_study

__all__ = ["generate", "make_study", "sample_study", "test_labels", "write_study"]
