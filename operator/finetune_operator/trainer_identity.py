"""Who the trainer is to the API server, and what it may do there (pure builders).

A training pod reports its progress by patching its FineTuneJob's `status.progress`. It runs as
its namespace's `finetune-trainer` ServiceAccount, made once per namespace by the operator with a
Role that lets it patch the status of FineTuneJobs there. A ValidatingAdmissionPolicy, kept by
the operator at start-up, narrows that to the trainer's own job and field: the kubelet gives the
pod a token bound to it, the API server puts the pod's name in the request's
`userInfo.extra["authentication.kubernetes.io/pod-name"]`, and the policy admits the patch only
when that pod is one the Job controller made for the FineTuneJob's training Job (named
`<Job>-<5 characters>`, or `<Job>-<index>-<5 characters>` in an Indexed Job) and the patch leaves
every other status field as it was. A token not bound to a pod is refused.

Until 2026-11 every FineTuneJob had a ServiceAccount, a Role and a RoleBinding of its own: three
more creates and three more watch events per job, about 40 % of the operator's CPU in a burst
(hack/bench_operator.py, measured with and without them).
"""

from __future__ import annotations

from kubernetes.client import (
    RbacV1Subject,
    V1MatchCondition,
    V1MatchResources,
    V1NamedRuleWithOperations,
    V1ObjectMeta,
    V1PolicyRule,
    V1Role,
    V1RoleBinding,
    V1RoleRef,
    V1ServiceAccount,
    V1ValidatingAdmissionPolicy,
    V1ValidatingAdmissionPolicyBinding,
    V1ValidatingAdmissionPolicyBindingSpec,
    V1ValidatingAdmissionPolicySpec,
    V1Validation,
    V1Variable,
)

from finetune_api.resource import GROUP, PLURAL, FineTuneJobStatus
from finetune_operator.builders import MAX_CHILD_NAME, TRAINER_ACCOUNT, TRAINER_JOB_SUFFIX

ACCOUNT = TRAINER_ACCOUNT
POLICY = f"finetune-trainer.{GROUP}"
IDENTITY_LABELS = {
    "app.kubernetes.io/managed-by": "finetune-operator",
    "app.kubernetes.io/component": "trainer-identity",
}
POD_NAME_CLAIM = "authentication.kubernetes.io/pod-name"
# What the Job controller appends to a Job's name to name a pod: [<index>-]<5 random characters>.
POD_SUFFIX = "^([0-9]+-)?[a-z0-9]{5}$"
# A FineTuneJob whose name is at most this long has the Job <name>-train (builders.child_name);
# a longer one has a hash in it, which the policy reads from the status the operator wrote.
LONGEST_PLAIN_NAME = MAX_CHILD_NAME - len(TRAINER_JOB_SUFFIX) - 1


def _metadata(name: str, namespace: str | None = None) -> V1ObjectMeta:
    return V1ObjectMeta(name=name, namespace=namespace, labels=dict(IDENTITY_LABELS))


def build_account(namespace: str) -> V1ServiceAccount:
    return V1ServiceAccount(metadata=_metadata(ACCOUNT, namespace))


def build_role(namespace: str) -> V1Role:
    """Patch FineTuneJob status in the namespace (the policy narrows it); no reads."""
    rule = V1PolicyRule(api_groups=[GROUP], resources=[f"{PLURAL}/status"], verbs=["patch"])
    return V1Role(metadata=_metadata(ACCOUNT, namespace), rules=[rule])


def build_role_binding(namespace: str) -> V1RoleBinding:
    return V1RoleBinding(
        metadata=_metadata(ACCOUNT, namespace),
        role_ref=V1RoleRef(api_group="rbac.authorization.k8s.io", kind="Role", name=ACCOUNT),
        subjects=[RbacV1Subject(kind="ServiceAccount", name=ACCOUNT, namespace=namespace)],
    )


def is_identity(obj: object) -> bool:
    """Whether a built object is part of a namespace's trainer identity."""
    metadata = getattr(obj, "metadata", None)
    labels = getattr(metadata, "labels", None) or {}
    return bool(
        labels.get("app.kubernetes.io/component") == IDENTITY_LABELS["app.kubernetes.io/component"]
    )


def build_identity(namespace: str) -> tuple[V1ServiceAccount, V1Role, V1RoleBinding]:
    """The namespace's trainer identity, in the order it is made (the binding after the Role)."""
    return build_account(namespace), build_role(namespace), build_role_binding(namespace)


def _unchanged(field: str) -> str:
    """CEL: the patch leaves status.<field> as it was (absent stays absent)."""
    new, old = f"object.status.{field}", f"oldObject.status.{field}"
    return f"has({new}) == (has(oldObject.status) && has({old})) && (!has({new}) || {new} == {old})"


def _owned_fields() -> list[str]:
    """The status fields the operator owns: all but the trainer's progress."""
    return [
        info.alias or name
        for name, info in FineTuneJobStatus.model_fields.items()
        if name != "progress"
    ]


def build_policy() -> V1ValidatingAdmissionPolicy:
    job = (
        f"size(request.name) <= {LONGEST_PLAIN_NAME} ? request.name + '-{TRAINER_JOB_SUFFIX}' : "
        "(has(oldObject.status) && has(oldObject.status.jobName) ? oldObject.status.jobName : '')"
    )
    pods = (
        f"'{POD_NAME_CLAIM}' in request.userInfo.extra ? "
        f"request.userInfo.extra['{POD_NAME_CLAIM}'] : []"
    )
    own_pod = (
        "variables.job != '' && variables.pods.exists(p, p.startsWith(variables.job + '-') && "
        f"p.substring(size(variables.job) + 1).matches('{POD_SUFFIX}'))"
    )
    refusal = (
        "'the trainer may patch only its own FineTuneJob: ' + (size(variables.pods) == 0 ? "
        "'its token is not bound to a pod' : 'pod ' + variables.pods[0] + "
        "' is not a training pod of ' + request.name)"
    )
    return V1ValidatingAdmissionPolicy(
        api_version="admissionregistration.k8s.io/v1",
        kind="ValidatingAdmissionPolicy",
        metadata=V1ObjectMeta(name=POLICY, labels=dict(IDENTITY_LABELS)),
        spec=V1ValidatingAdmissionPolicySpec(
            failure_policy="Fail",
            match_constraints=V1MatchResources(
                resource_rules=[
                    V1NamedRuleWithOperations(
                        api_groups=[GROUP],
                        api_versions=["*"],
                        resources=[f"{PLURAL}/status"],
                        operations=["UPDATE"],
                    )
                ]
            ),
            match_conditions=[
                V1MatchCondition(
                    name="the-trainer",
                    expression=(
                        "request.userInfo.username == "
                        f"'system:serviceaccount:' + request.namespace + ':{ACCOUNT}'"
                    ),
                )
            ],
            variables=[
                V1Variable(name="job", expression=job),
                V1Variable(name="pods", expression=pods),
            ],
            validations=[
                V1Validation(expression=own_pod, message_expression=refusal, reason="Forbidden"),
                V1Validation(
                    expression=" && ".join(f"({_unchanged(f)})" for f in _owned_fields()),
                    message="the trainer may change only status.progress",
                    reason="Forbidden",
                ),
            ],
        ),
    )


def build_policy_binding() -> V1ValidatingAdmissionPolicyBinding:
    return V1ValidatingAdmissionPolicyBinding(
        api_version="admissionregistration.k8s.io/v1",
        kind="ValidatingAdmissionPolicyBinding",
        metadata=V1ObjectMeta(name=POLICY, labels=dict(IDENTITY_LABELS)),
        spec=V1ValidatingAdmissionPolicyBindingSpec(
            policy_name=POLICY, validation_actions=["Deny"]
        ),
    )
