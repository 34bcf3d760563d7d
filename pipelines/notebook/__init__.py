"""Code competitions: the ensemble as a Kaggle notebook that predicts offline on a hidden test set.

Data flows one way, a module per step:

- `bundle`: the Kaggle dataset's files — every member's kept weights, a manifest (ens version, the competition's
  descriptor, vocab, per member its config, normalisation, TTA and weight, the blend) and ens itself as a
  wheel — named by a hash of their content, so an unchanged ensemble is never uploaded twice;
- `script`: the notebook's code (a Kaggle script kernel), which finds the manifest and the competition's data
  under /kaggle/input, puts the wheel on the path (no pip, no network) and runs `offline`;
- `offline`: what runs on Kaggle: rebuild each member from its weights, predict whatever test images are there
  with its TTA, blend, write and check `submission.csv`;
- `verify`: the same script run here first, in a child process on a /kaggle-like tree with the network refused:
  its CSV must equal what the cached test probabilities give, and its time scales to the hidden test set;
- `push`: upload the dataset (checked file by file once Kaggle has it), push the notebook, follow its run, fetch
  and check its CSV, submit the version (CreateCodeSubmission), all recorded in the submission history.

Only `offline` imports torch/fastai (on Kaggle, or in the local check's child process).
"""
