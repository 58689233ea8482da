"""The Kubernetes executor: one PVC and one Job per step attempt, the in-pod download/upload
wrapper, and the live sync of DataKind/Operator custom resources into the registry."""
