"""MLflow (the only mlflow importer): run tracking, registry calls and the PHI guard."""
