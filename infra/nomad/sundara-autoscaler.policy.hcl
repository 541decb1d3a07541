# ACL policy for the token the autoscaler of sundara-validator uses (NOMAD_TOKEN). Its
# Nomad driver makes two calls, both in the `default` namespace (it sends no namespace):
#   POST /v1/job/sundara-workers/scale       sets group `worker`'s count   (scale-job)
#   POST /v1/allocation/<alloc id>/stop      replaces one worker            (alloc-lifecycle)
#
#   nomad acl policy apply -description "sundara autoscaler" sundara-autoscaler infra/nomad/sundara-autoscaler.policy.hcl
#   nomad acl token create -name sundara-autoscaler -policy sundara-autoscaler -type client
namespace "default" {
  capabilities = ["scale-job", "alloc-lifecycle"]
}
