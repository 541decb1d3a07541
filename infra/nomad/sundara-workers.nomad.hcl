# Sundara's miners on Nomad: group `worker` (CPU, sized by the autoscaler of
# sundara-validator) and group `gpu-worker` (one GPU each, count set here). Each
# allocation runs one worker whose id is the pool prefix and its allocation id, which is
# how the autoscaler's Nomad driver maps a dead or quarantined worker to the allocation it
# stops. The validator's own pool: every worker connects to NATS over TLS (pinning nats_ca)
# as the NKey user `pool` (pool.nk of `sundara auth init`, for worker ids known only when
# they start), both from this job's variable. Run after sundara-infra:
#
#   nomad var put nomad/jobs/sundara-workers nats_ca=@nats-tls/ca.pem pool=@nats-auth/pool.nk
#   nomad job run infra/nomad/sundara-workers.nomad.hcl
#   nomad job run -var gpu_count=2 infra/nomad/sundara-workers.nomad.hcl   # with GPU workers
#
# Re-running the job resets group `worker` to worker_count; the autoscaler then scales it
# again. The job stays in the namespace the autoscaler's requests go to (`default`).

variable "datacenters" {
  type    = list(string)
  default = ["*"]
}

variable "image" {
  description = "The CPU image built from infra/Dockerfile."
  type        = string
  default     = "sundara:latest"
}

variable "gpu_image" {
  description = "The GPU image: infra/Dockerfile with ORT_PACKAGE=onnxruntime-gpu[cuda,cudnn], CARGO_FEATURES=sundara-runtime/cuda."
  type        = string
  default     = "sundara:gpu"
}

variable "nats_addr" {
  description = "host:port of NATS (TLS; a name its certificate holds); empty: the sundara-nats Nomad service."
  type        = string
  default     = ""
}

variable "otlp_endpoint" {
  description = "OTLP/gRPC endpoint for traces; empty: no traces."
  type        = string
  default     = ""
}

variable "pool_prefix" {
  description = "Worker ids are this and the allocation id (the autoscaler's --pool-prefix)."
  type        = string
  default     = "pool-"
}

variable "worker_count" {
  description = "CPU workers when the job is (re)submitted."
  type        = number
  default     = 2
}

variable "max_workers" {
  description = "Most CPU workers Nomad accepts for the group (the autoscaler's --max-workers at most)."
  type        = number
  default     = 16
}

variable "worker_threads" {
  description = "Inference threads of each CPU worker."
  type        = number
  default     = 1
}

variable "gpu_count" {
  description = "GPU workers (one GPU each)."
  type        = number
  default     = 0
}

variable "gpu_slice" {
  description = "The GPU worker's slice (docs/workers.md): memory its models may hold, threads running at once."
  type        = string
  default     = "cuda:0,memory=20G,threads=2,slots=64"
}

locals {
  nats_env  = var.nats_addr != "" ? "SUNDARA_NATS_URL=tls://${var.nats_addr}\n" : "{{ range nomadService \"sundara-nats\" }}SUNDARA_NATS_URL=tls://{{ .Address }}:{{ .Port }}\n{{ end }}"
  otlp_env  = var.otlp_endpoint != "" ? "OTEL_EXPORTER_OTLP_ENDPOINT=${var.otlp_endpoint}\n" : ""
  # Miners reach only NATS (their reports go through the scheduler's fleet gateway): no Redis.
  endpoints = "${local.nats_env}${local.otlp_env}"

  nats_ca   = "{{ with nomadVar \"nomad/jobs/sundara-workers\" }}{{ .nats_ca }}{{ end }}"
  pool_seed = "{{ with nomadVar \"nomad/jobs/sundara-workers\" }}{{ .pool }}{{ end }}"
}

job "sundara-workers" {
  datacenters = var.datacenters
  type        = "service"

  group "worker" {
    count = var.worker_count

    # The autoscaler's POST /v1/job/sundara-workers/scale is refused outside [min, max].
    scaling {
      enabled = true
      min     = 0
      max     = var.max_workers
    }

    network {
      port "metrics" {
        to = 9464
      }
    }

    service {
      name     = "sundara-worker"
      provider = "nomad"
      port     = "metrics"
      tags     = ["metrics"]

      check {
        type     = "http"
        path     = "/metrics"
        interval = "15s"
        timeout  = "3s"
      }
    }

    task "worker" {
      driver = "docker"
      # SIGTERM lets a worker finish what it holds.
      kill_timeout = "30s"

      config {
        image = var.image
        ports = ["metrics"]
        args  = ["worker", "--id", "${var.pool_prefix}${NOMAD_ALLOC_ID}", "--threads", "${var.worker_threads}"]
      }

      env {
        SUNDARA_METRICS_ADDR = "0.0.0.0:9464"
        SUNDARA_LOG_FORMAT   = "json"
        SUNDARA_NATS_CA      = "/local/ca.pem"
        SUNDARA_NATS_CREDS   = "/secrets/nats.nk"
      }

      template {
        data        = local.endpoints
        destination = "local/endpoints.env"
        env         = true
      }

      template {
        data        = local.nats_ca
        destination = "local/ca.pem"
      }

      template {
        data        = local.pool_seed
        destination = "secrets/nats.nk"
        perms       = "0600"
        uid         = 10001
        gid         = 10001
      }

      resources {
        cpu    = 1000
        memory = 2048
      }
    }
  }

  group "gpu-worker" {
    count = var.gpu_count

    network {
      port "metrics" {
        to = 9464
      }
    }

    service {
      name     = "sundara-worker"
      provider = "nomad"
      port     = "metrics"
      tags     = ["metrics", "gpu"]

      check {
        type     = "http"
        path     = "/metrics"
        interval = "15s"
        timeout  = "3s"
      }
    }

    task "worker" {
      driver       = "docker"
      kill_timeout = "30s"

      config {
        image = var.gpu_image
        ports = ["metrics"]
        # The device plugin exposes the allocated GPU as device 0 of the container.
        args = ["worker", "--id", "${var.pool_prefix}${NOMAD_ALLOC_ID}", "--slice", var.gpu_slice]
      }

      env {
        SUNDARA_METRICS_ADDR = "0.0.0.0:9464"
        SUNDARA_LOG_FORMAT   = "json"
        SUNDARA_NATS_CA      = "/local/ca.pem"
        SUNDARA_NATS_CREDS   = "/secrets/nats.nk"
      }

      template {
        data        = local.endpoints
        destination = "local/endpoints.env"
        env         = true
      }

      template {
        data        = local.nats_ca
        destination = "local/ca.pem"
      }

      template {
        data        = local.pool_seed
        destination = "secrets/nats.nk"
        perms       = "0600"
        uid         = 10001
        gid         = 10001
      }

      resources {
        cpu    = 2000
        memory = 8192

        device "nvidia/gpu" {
          count = 1
        }
      }
    }
  }
}
