# Sundara's stores on Nomad: NATS with JetStream and Redis with an append-only file, each
# on a host volume, each registered as a Nomad service (sundara-nats, sundara-redis) that
# sundara-validator and sundara-workers find through nomadService templates.
#
#   nomad job run infra/nomad/sundara-infra.nomad.hcl
#
# The client nodes that may run them need the host volumes, in the client config:
#   client {
#     host_volume "sundara-nats"  { path = "/srv/sundara/nats"  read_only = false }
#     host_volume "sundara-redis" { path = "/srv/sundara/redis" read_only = false }
#   }

variable "datacenters" {
  description = "Datacenters the job may run in."
  type        = list(string)
  default     = ["*"]
}

variable "nats_image" {
  type    = string
  default = "nats:2.11-alpine"
}

variable "redis_image" {
  type    = string
  default = "redis:7-alpine"
}

variable "nats_volume" {
  description = "Client host volume that keeps JetStream's store."
  type        = string
  default     = "sundara-nats"
}

variable "redis_volume" {
  description = "Client host volume that keeps Redis's append-only file."
  type        = string
  default     = "sundara-redis"
}

job "sundara-infra" {
  datacenters = var.datacenters
  type        = "service"

  group "nats" {
    count = 1

    network {
      # Static: miners outside the cluster connect to this address.
      port "client" {
        static = 4222
        to     = 4222
      }
      port "monitor" {
        to = 8222
      }
    }

    volume "jetstream" {
      type      = "host"
      source    = var.nats_volume
      read_only = false
    }

    service {
      name     = "sundara-nats"
      provider = "nomad"
      port     = "client"

      check {
        type     = "http"
        port     = "monitor"
        path     = "/healthz?js-enabled-only=true"
        interval = "10s"
        timeout  = "2s"
      }
    }

    task "nats" {
      driver = "docker"

      config {
        image = var.nats_image
        ports = ["client", "monitor"]
        args  = ["nats-server", "-c", "/local/sundara.conf", "-js", "-sd", "/data", "-m", "8222"]
      }

      # infra/nats.conf's settings: max_payload for the largest submission ingress accepts
      # (tests/deployment.rs checks both files).
      template {
        data        = "max_payload: 8388608\n"
        destination = "local/sundara.conf"
      }

      volume_mount {
        volume      = "jetstream"
        destination = "/data"
      }

      resources {
        cpu    = 500
        memory = 512
      }
    }
  }

  group "redis" {
    count = 1

    network {
      port "redis" {
        static = 6379
        to     = 6379
      }
    }

    volume "data" {
      type      = "host"
      source    = var.redis_volume
      read_only = false
    }

    service {
      name     = "sundara-redis"
      provider = "nomad"
      port     = "redis"

      check {
        type     = "tcp"
        interval = "10s"
        timeout  = "2s"
      }
    }

    task "redis" {
      driver = "docker"

      config {
        image = var.redis_image
        ports = ["redis"]
        args  = ["redis-server", "--appendonly", "yes", "--maxmemory", "768mb", "--maxmemory-policy", "noeviction"]
      }

      volume_mount {
        volume      = "data"
        destination = "/data"
      }

      resources {
        cpu    = 500
        memory = 1024
      }
    }
  }
}
