"""medxfer: transfer learning for small, imbalanced medical imaging datasets.

The package reads as its layers, lowest first; a module imports only from its own layer or lower ones
(tests/test_layers.py holds this):

    core        errors, console UI, workspace paths, JSON helpers
    config      the data spec and the training recipe (every rule, every fix-it message)
    io          DICOM, NIfTI and PHI pseudonyms (the only pydicom / nibabel importers)
    stats       metrics, bootstrap CIs, calibration, plots (the only matplotlib importer)
    models      encoders, weights, heads behind one registry (``medxfer.models``; the repo's ``models/``)
    ingest      the ingest and split stages, and the manifest x splits reader
    data        datasets, caches, loaders, transforms, augmentation (MONAI, albumentations)
    tracking    MLflow (the only mlflow importer) and the PHI guard in front of it
    training    the train stage, its loop and callbacks
    planning    the dataset fingerprint and the plan derived from it (``medxfer plan``), beside training
    evaluation  the evaluate stage and the model card
    handoff     bundle, register/promote, pyfunc, predict, export
    cli, runall, demo   the commands
"""

__version__ = "0.1.0"
