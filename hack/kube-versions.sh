# The Kubernetes releases the project is built and tested against (sourced by hack/ scripts).
# Newest: the newest patch of the newest minor the Go module proxy serves.
# Oldest: 1.34, the first release with Dynamic Resource Allocation (resource.k8s.io/v1) and
# the Job API's podReplacementPolicy generally available; both are part of the product.
KUBE_VERSION_NEWEST=1.37.2
KUBE_VERSION_OLDEST=1.34.4
