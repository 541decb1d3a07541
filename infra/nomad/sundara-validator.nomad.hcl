# Sundara's validator side on Nomad: ingress, scheduler, verifier, rewarder and the
# autoscaler, one group each. Run after sundara-infra, once its variables exist:
#
#   nomad var put nomad/jobs/sundara-validator nats_ca=@nats-tls/ca.pem redis_password=@redis.password
#   nomad var put nomad/jobs/sundara-validator/ingress/ingress service_ingress=@nats-auth/service-ingress.nk
#   ... (one per task: docs/deployment.md, "Keys in Nomad variables")
#   nomad job run infra/nomad/sundara-validator.nomad.hcl
#
# Secured: every task connects to NATS over TLS (pinning the CA in nats_ca) as its own NKey
# user, whose seed is in its task's own variable (nomad/jobs/sundara-validator/<task>/<task>,
# readable by that task only): service_<task>. Also there: validator_secret (signs
# assignment tickets; scheduler and verifier, read from a file) and nomad_token (the
# autoscaler's, with the scale-job and alloc-lifecycle capabilities on the namespace of
# sundara-workers; see docs/deployment.md). Redis' password (redis_password, the same as
# sundara-infra's) goes into SUNDARA_REDIS_URL. Files holding keys are rendered into the
# task's secrets/ directory, owned by the image's user (uid 10001), mode 0600. NATS and Redis
# are the sundara-nats and sundara-redis Nomad services unless nats_addr / redis_addr are
# given. Every task serves Prometheus metrics on its `metrics` port, registered as the
# Nomad service sundara-<task> with tag `metrics`.

variable "datacenters" {
  type    = list(string)
  default = ["*"]
}

variable "image" {
  description = "The image built from infra/Dockerfile."
  type        = string
  default     = "sundara:latest"
}

variable "nats_addr" {
  description = "host:port of NATS (TLS; a name its certificate holds); empty: the sundara-nats Nomad service."
  type        = string
  default     = ""
}

variable "redis_addr" {
  description = "host:port of Redis (user sundara, redis_password); empty: the sundara-redis Nomad service."
  type        = string
  default     = ""
}

variable "otlp_endpoint" {
  description = "OTLP/gRPC endpoint for traces (e.g. http://otel-collector.example:4317); empty: no traces."
  type        = string
  default     = ""
}

variable "nomad_addr" {
  description = "host:port of the Nomad HTTP API (plain HTTP) for the autoscaler; empty: the Nomad agent on its node."
  type        = string
  default     = ""
}

variable "workers_job" {
  description = "The job whose group the autoscaler sizes (infra/nomad/sundara-workers.nomad.hcl)."
  type        = string
  default     = "sundara-workers"
}

variable "workers_group" {
  type    = string
  default = "worker"
}

variable "pool_prefix" {
  description = "Worker ids of the pool are this and the allocation id (as in sundara-workers)."
  type        = string
  default     = "pool-"
}

variable "min_workers" {
  type    = number
  default = 2
}

variable "max_workers" {
  description = "At most the `max` of the workers group's scaling block."
  type        = number
  default     = 16
}

variable "chain" {
  description = "On a Bittensor subnet: run group `chain` (metagraph sync, the auth callout miners join through, weights on chain; needs `sundara auth init --chain`, docs/bittensor.md)."
  type        = bool
  default     = false
}

variable "netuid" {
  description = "The subnet's netuid (with chain)."
  type        = number
  default     = 0
}

variable "validator_hotkey" {
  description = "The validator's hotkey, its SS58 address: miners sign their joins for it (with chain)."
  type        = string
  default     = ""
}

variable "chain_network" {
  description = "The Bittensor network the bridge talks to: finney, test, or a ws(s):// endpoint (with chain)."
  type        = string
  default     = "finney"
}

variable "wallet_dir" {
  description = "Host directory of the validator's Bittensor wallets, mounted read-only into group chain."
  type        = string
  default     = "/etc/sundara/wallets"
}

variable "wallet_name" {
  description = "The validator's wallet and hotkey names in wallet_dir (with chain)."
  type        = string
  default     = "default"
}

variable "worker_threads" {
  description = "Inference threads of each pool worker (its --threads)."
  type        = number
  default     = 1
}

locals {
  # An env file for every task: where NATS (TLS) and Redis (with its password) are, and
  # where traces go. It holds the password: rendered into secrets/.
  nats_env   = var.nats_addr != "" ? "SUNDARA_NATS_URL=tls://${var.nats_addr}\n" : "{{ range nomadService \"sundara-nats\" }}SUNDARA_NATS_URL=tls://{{ .Address }}:{{ .Port }}\n{{ end }}"
  redis_host = var.redis_addr != "" ? var.redis_addr : "{{ range nomadService \"sundara-redis\" }}{{ .Address }}:{{ .Port }}{{ end }}"
  redis_env  = "{{ with nomadVar \"nomad/jobs/sundara-validator\" }}SUNDARA_REDIS_URL=redis://sundara:{{ .redis_password | trimSpace }}@${local.redis_host}/\n{{ end }}"
  otlp_env   = var.otlp_endpoint != "" ? "OTEL_EXPORTER_OTLP_ENDPOINT=${var.otlp_endpoint}\n" : ""
  endpoints  = "${local.nats_env}${local.redis_env}${local.otlp_env}"
  # The verifier never touches Redis: it is not given it.
  nats_endpoints = "${local.nats_env}${local.otlp_env}"

  # The CA every task pins (not secret).
  nats_ca = "{{ with nomadVar \"nomad/jobs/sundara-validator\" }}{{ .nats_ca }}{{ end }}"

  # Nomad interpolates ${attr...} when it places the task.
  nomad_addr = var.nomad_addr != "" ? var.nomad_addr : "${attr.unique.network.ip-address}:4646"
}

job "sundara-validator" {
  datacenters = var.datacenters
  type        = "service"

  group "ingress" {
    network {
      port "metrics" {
        to = 9464
      }
    }

    service {
      name     = "sundara-ingress"
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

    task "ingress" {
      driver = "docker"

      config {
        image = var.image
        ports = ["metrics"]
        args  = ["ingress"]
      }

      env {
        SUNDARA_METRICS_ADDR = "0.0.0.0:9464"
        SUNDARA_LOG_FORMAT   = "json"
        SUNDARA_NATS_CA      = "/local/ca.pem"
        SUNDARA_NATS_CREDS   = "/secrets/nats.nk"
      }

      template {
        data        = local.endpoints
        destination = "secrets/endpoints.env"
        perms       = "0600"
        env         = true
      }

      template {
        data        = local.nats_ca
        destination = "local/ca.pem"
      }

      template {
        data        = "{{ with nomadVar \"nomad/jobs/sundara-validator/ingress/ingress\" }}{{ .service_ingress }}{{ end }}"
        destination = "secrets/nats.nk"
        perms       = "0600"
        uid         = 10001
        gid         = 10001
      }

      resources {
        cpu    = 500
        memory = 256
      }
    }
  }

  group "scheduler" {
    network {
      port "metrics" {
        to = 9464
      }
    }

    service {
      name     = "sundara-scheduler"
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

    task "scheduler" {
      driver = "docker"

      config {
        image = var.image
        ports = ["metrics"]
        args  = ["scheduler"]
      }

      env {
        SUNDARA_METRICS_ADDR = "0.0.0.0:9464"
        SUNDARA_LOG_FORMAT   = "json"
        SUNDARA_NATS_CA      = "/local/ca.pem"
        SUNDARA_NATS_CREDS   = "/secrets/nats.nk"
        SUNDARA_SECRET_FILE  = "/secrets/validator.secret"
      }

      template {
        data        = local.endpoints
        destination = "secrets/endpoints.env"
        perms       = "0600"
        env         = true
      }

      template {
        data        = local.nats_ca
        destination = "local/ca.pem"
      }

      template {
        data        = "{{ with nomadVar \"nomad/jobs/sundara-validator/scheduler/scheduler\" }}{{ .service_scheduler }}{{ end }}"
        destination = "secrets/nats.nk"
        perms       = "0600"
        uid         = 10001
        gid         = 10001
      }

      template {
        data        = "{{ with nomadVar \"nomad/jobs/sundara-validator/scheduler/scheduler\" }}{{ .validator_secret }}{{ end }}"
        destination = "secrets/validator.secret"
        perms       = "0600"
        uid         = 10001
        gid         = 10001
      }

      resources {
        cpu    = 1000
        memory = 512
      }
    }
  }

  group "verifier" {
    network {
      port "metrics" {
        to = 9464
      }
    }

    service {
      name     = "sundara-verifier"
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

    task "verifier" {
      driver = "docker"

      config {
        image = var.image
        ports = ["metrics"]
        # The reference runtime (audits, escalations) runs models on this task's CPU.
        args = ["verifier", "--reference-threads", "2"]
      }

      env {
        SUNDARA_METRICS_ADDR = "0.0.0.0:9464"
        SUNDARA_LOG_FORMAT   = "json"
        SUNDARA_NATS_CA      = "/local/ca.pem"
        SUNDARA_NATS_CREDS   = "/secrets/nats.nk"
        SUNDARA_SECRET_FILE  = "/secrets/validator.secret"
      }

      template {
        data        = local.nats_endpoints
        destination = "secrets/endpoints.env"
        perms       = "0600"
        env         = true
      }

      template {
        data        = local.nats_ca
        destination = "local/ca.pem"
      }

      template {
        data        = "{{ with nomadVar \"nomad/jobs/sundara-validator/verifier/verifier\" }}{{ .service_verifier }}{{ end }}"
        destination = "secrets/nats.nk"
        perms       = "0600"
        uid         = 10001
        gid         = 10001
      }

      template {
        data        = "{{ with nomadVar \"nomad/jobs/sundara-validator/verifier/verifier\" }}{{ .validator_secret }}{{ end }}"
        destination = "secrets/validator.secret"
        perms       = "0600"
        uid         = 10001
        gid         = 10001
      }

      resources {
        cpu    = 2000
        memory = 2048
      }
    }
  }

  group "rewarder" {
    network {
      port "metrics" {
        to = 9464
      }
    }

    service {
      name     = "sundara-rewarder"
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

    task "rewarder" {
      driver = "docker"

      config {
        image = var.image
        ports = ["metrics"]
        args  = ["rewarder", "--epoch-secs", "60"]
      }

      env {
        SUNDARA_METRICS_ADDR = "0.0.0.0:9464"
        SUNDARA_LOG_FORMAT   = "json"
        SUNDARA_NATS_CA      = "/local/ca.pem"
        SUNDARA_NATS_CREDS   = "/secrets/nats.nk"
      }

      template {
        data        = local.endpoints
        destination = "secrets/endpoints.env"
        perms       = "0600"
        env         = true
      }

      template {
        data        = local.nats_ca
        destination = "local/ca.pem"
      }

      template {
        data        = "{{ with nomadVar \"nomad/jobs/sundara-validator/rewarder/rewarder\" }}{{ .service_rewarder }}{{ end }}"
        destination = "secrets/nats.nk"
        perms       = "0600"
        uid         = 10001
        gid         = 10001
      }

      resources {
        cpu    = 500
        memory = 256
      }
    }
  }
  group "jobs" {
    network {
      port "metrics" {
        to = 9464
      }
    }

    service {
      name     = "sundara-jobs"
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

    task "jobs" {
      driver = "docker"

      config {
        image = var.image
        ports = ["metrics"]
        # Tenants' batch jobs (docs/jobs.md §3): one per stack.
        args = ["jobs", "serve"]
      }

      env {
        SUNDARA_METRICS_ADDR = "0.0.0.0:9464"
        SUNDARA_LOG_FORMAT   = "json"
        SUNDARA_NATS_CA      = "/local/ca.pem"
        SUNDARA_NATS_CREDS   = "/secrets/nats.nk"
      }

      template {
        data        = local.nats_endpoints
        destination = "secrets/endpoints.env"
        perms       = "0600"
        env         = true
      }

      template {
        data        = local.nats_ca
        destination = "local/ca.pem"
      }

      template {
        data        = "{{ with nomadVar \"nomad/jobs/sundara-validator/jobs/jobs\" }}{{ .service_jobs }}{{ end }}"
        destination = "secrets/nats.nk"
        perms       = "0600"
        uid         = 10001
        gid         = 10001
      }

      resources {
        cpu    = 500
        memory = 256
      }
    }
  }

  group "autoscaler" {
    network {
      port "metrics" {
        to = 9464
      }
    }

    service {
      name     = "sundara-autoscaler"
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

    task "autoscaler" {
      driver = "docker"

      config {
        image = var.image
        ports = ["metrics"]
        # Sizes group `worker` of job sundara-workers through Nomad's HTTP API, and replaces
        # a dead or quarantined worker `<pool_prefix><alloc id>` by stopping its allocation.
        args = [
          "autoscaler",
          "--driver", "nomad",
          "--nomad-addr", local.nomad_addr,
          "--nomad-job", var.workers_job,
          "--nomad-group", var.workers_group,
          "--pool-prefix", var.pool_prefix,
          "--min-workers", "${var.min_workers}",
          "--max-workers", "${var.max_workers}",
          "--worker-threads", "${var.worker_threads}",
        ]
      }

      env {
        SUNDARA_METRICS_ADDR = "0.0.0.0:9464"
        SUNDARA_LOG_FORMAT   = "json"
        SUNDARA_NATS_CA      = "/local/ca.pem"
        SUNDARA_NATS_CREDS   = "/secrets/nats.nk"
      }

      template {
        data        = local.endpoints
        destination = "secrets/endpoints.env"
        perms       = "0600"
        env         = true
      }

      template {
        data        = local.nats_ca
        destination = "local/ca.pem"
      }

      template {
        data        = "{{ with nomadVar \"nomad/jobs/sundara-validator/autoscaler/autoscaler\" }}{{ .service_autoscaler }}{{ end }}"
        destination = "secrets/nats.nk"
        perms       = "0600"
        uid         = 10001
        gid         = 10001
      }

      template {
        data        = "{{ with nomadVar \"nomad/jobs/sundara-validator/autoscaler/autoscaler\" }}NOMAD_TOKEN={{ .nomad_token }}\n{{ end }}"
        destination = "secrets/nomad.env"
        perms       = "0600"
        env         = true
      }

      resources {
        cpu    = 200
        memory = 256
      }
    }
  }

  # The Bittensor subnet (var.chain): reads the metagraph, answers nats-server's auth
  # callout (miners join by registered hotkey; tenants by their keys) and sends each
  # epoch's weights through the bridge on the Bittensor SDK (image target `chain`), signed
  # by the validator's hotkey from the wallet mounted read-only. Its seed is service_chain
  # in nomad/jobs/sundara-validator/chain/chain; the callout issuer's seed (callout_issuer)
  # and the users' list (auth_conf: nats-auth/auth.conf, public keys only) come from the
  # same variable.
  group "chain" {
    count = var.chain ? 1 : 0

    network {
      port "metrics" {
        to = 9464
      }
    }

    service {
      name     = "sundara-chain"
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

    task "chain" {
      driver = "docker"

      config {
        image   = "${var.image}-chain"
        ports   = ["metrics"]
        volumes = ["${var.wallet_dir}:/wallets:ro"]
        args = [
          "chain", "serve",
          "--netuid", "${var.netuid}",
          "--validator-hotkey", var.validator_hotkey,
          "--credentials-dir", "/secrets/auth",
          "--bridge", "python3 /opt/sundara/scripts/bittensor_bridge.py --network ${var.chain_network} --wallet-path /wallets --wallet-name ${var.wallet_name} --wallet-hotkey ${var.wallet_name}",
        ]
      }

      env {
        SUNDARA_METRICS_ADDR = "0.0.0.0:9464"
        SUNDARA_LOG_FORMAT   = "json"
        SUNDARA_NATS_CA      = "/local/ca.pem"
        SUNDARA_NATS_CREDS   = "/secrets/nats.nk"
      }

      template {
        data        = local.endpoints
        destination = "secrets/endpoints.env"
        perms       = "0600"
        env         = true
      }

      template {
        data        = local.nats_ca
        destination = "local/ca.pem"
      }

      template {
        data        = "{{ with nomadVar \"nomad/jobs/sundara-validator/chain/chain\" }}{{ .service_chain }}{{ end }}"
        destination = "secrets/nats.nk"
        perms       = "0600"
        uid         = 10001
        gid         = 10001
      }

      template {
        data        = "{{ with nomadVar \"nomad/jobs/sundara-validator/chain/chain\" }}{{ .auth_conf }}{{ end }}"
        destination = "secrets/auth/auth.conf"
        perms       = "0600"
        uid         = 10001
        gid         = 10001
      }

      template {
        data        = "{{ with nomadVar \"nomad/jobs/sundara-validator/chain/chain\" }}{{ .callout_issuer }}{{ end }}"
        destination = "secrets/auth/callout-issuer.nk"
        perms       = "0600"
        uid         = 10001
        gid         = 10001
      }

      resources {
        cpu    = 200
        memory = 512
      }
    }
  }
}
