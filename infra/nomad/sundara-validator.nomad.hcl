# Sundara's validator side on Nomad: ingress, scheduler, verifier, rewarder and the
# autoscaler, one group each. Run after sundara-infra:
#
#   nomad var put nomad/jobs/sundara-validator sundara_secret="$(openssl rand -hex 32)" nomad_token="<token>"
#   nomad job run infra/nomad/sundara-validator.nomad.hcl
#
# Secrets come from that Nomad variable (readable by this job's tasks only): SUNDARA_SECRET
# (signs assignment tickets; scheduler and verifier) and NOMAD_TOKEN (the autoscaler's,
# with the scale-job and alloc-lifecycle capabilities on the namespace of sundara-workers;
# see docs/deployment.md). NATS and Redis are the sundara-nats and sundara-redis Nomad
# services unless nats_url / redis_url are given. Every task serves Prometheus metrics on
# its `metrics` port, registered as the Nomad service sundara-<task> with tag `metrics`.

variable "datacenters" {
  type    = list(string)
  default = ["*"]
}

variable "image" {
  description = "The image built from infra/Dockerfile."
  type        = string
  default     = "sundara:latest"
}

variable "nats_url" {
  description = "NATS URL; empty: the sundara-nats Nomad service."
  type        = string
  default     = ""
}

variable "redis_url" {
  description = "Redis URL; empty: the sundara-redis Nomad service."
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

variable "worker_threads" {
  description = "Inference threads of each pool worker (its --threads)."
  type        = number
  default     = 1
}

locals {
  # An env file for every task: where NATS and Redis are, and where traces go.
  nats_env  = var.nats_url != "" ? "SUNDARA_NATS_URL=${var.nats_url}\n" : "{{ range nomadService \"sundara-nats\" }}SUNDARA_NATS_URL=nats://{{ .Address }}:{{ .Port }}\n{{ end }}"
  redis_env = var.redis_url != "" ? "SUNDARA_REDIS_URL=${var.redis_url}\n" : "{{ range nomadService \"sundara-redis\" }}SUNDARA_REDIS_URL=redis://{{ .Address }}:{{ .Port }}/\n{{ end }}"
  otlp_env  = var.otlp_endpoint != "" ? "OTEL_EXPORTER_OTLP_ENDPOINT=${var.otlp_endpoint}\n" : ""
  endpoints = "${local.nats_env}${local.redis_env}${local.otlp_env}"
  # The verifier never touches Redis: it is not given it.
  nats_endpoints = "${local.nats_env}${local.otlp_env}"

  secret_env = "{{ with nomadVar \"nomad/jobs/sundara-validator\" }}SUNDARA_SECRET={{ .sundara_secret }}\n{{ end }}"
  token_env  = "{{ with nomadVar \"nomad/jobs/sundara-validator\" }}NOMAD_TOKEN={{ .nomad_token }}\n{{ end }}"

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
      }

      template {
        data        = local.endpoints
        destination = "local/endpoints.env"
        env         = true
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
      }

      template {
        data        = local.endpoints
        destination = "local/endpoints.env"
        env         = true
      }

      template {
        data        = local.secret_env
        destination = "secrets/secret.env"
        env         = true
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
      }

      template {
        data        = local.nats_endpoints
        destination = "local/endpoints.env"
        env         = true
      }

      template {
        data        = local.secret_env
        destination = "secrets/secret.env"
        env         = true
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
      }

      template {
        data        = local.endpoints
        destination = "local/endpoints.env"
        env         = true
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
      }

      template {
        data        = local.endpoints
        destination = "local/endpoints.env"
        env         = true
      }

      template {
        data        = local.token_env
        destination = "secrets/nomad.env"
        env         = true
      }

      resources {
        cpu    = 200
        memory = 256
      }
    }
  }
}
