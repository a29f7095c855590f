"""The model package format, torch-free (numpy only), shared by training, serving and the operator:
``registry`` (versions, atomic commit), ``features`` (fitted transforms), ``profile`` (the training data
profile), ``validation`` (the data contract), ``drift`` (PSI/KS against the profile)."""
