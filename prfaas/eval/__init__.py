"""`prfaas eval`: the three deployments on the real services across an emulated two-datacenter link
(docs/evaluation.md), and the accelerator-profile emulation the nodes run under."""
