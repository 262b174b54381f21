"""Training the model (Sec 3.6, 4.2): `objective` (the MIL cost and the optimizer), `trainer`
(the training and validation loop), `metric_writer` (TensorBoard and JSONL), `workdir_lock`
(one run per workdir).
"""
