# Sundara's stores on Nomad: NATS with JetStream and Redis with an append-only file, each
# on a host volume, each registered as a Nomad service (sundara-nats, sundara-redis) that
# sundara-validator and sundara-workers find through nomadService templates.
#
# Secured: NATS speaks TLS only and knows one NKey user per role; Redis wants a password.
# The keys come from Nomad variables that only this job's tasks read, rendered into each
# task's secrets/ directory (docs/deployment.md, "Keys in Nomad variables", makes them):
#
#   nomad var put nomad/jobs/sundara-infra/nats/nats \
#     server_cert=@nats-tls/server.pem server_key=@nats-tls/server-key.pem auth_conf=@nats-auth/auth.conf
#   nomad var put nomad/jobs/sundara-infra/redis/redis redis_password=@redis.password
#   nomad job run infra/nomad/sundara-infra.nomad.hcl
#
# Putting auth_conf again (new tenants or miners) makes nats-server reload its users.
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
      # Static: miners outside the cluster connect to this address (TLS; its certificate
      # must name the address they use: `sundara tls init --host`).
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
        args  = ["nats-server", "-c", "/secrets/nats.conf", "-js", "-sd", "/data", "-m", "8222"]
      }

      # Go's soft memory limit: without it the heap grows to twice the streams' state
      # between collections (docs/reliability.md, the 30-minute soak). Size it to the node.
      env {
        GOMEMLIMIT = "3GiB"
      }

      # infra/nats.conf's settings (tests/deployment.rs serves both with the real server):
      # max_payload for the largest submission ingress accepts, TLS only on the client port,
      # and the users of `sundara auth init`. An include is relative to this file's directory.
      template {
        data        = <<-EOT
          max_payload: 8388608
          tls {
            cert_file: "/secrets/server.pem"
            key_file: "/secrets/server-key.pem"
            timeout: 5
          }
          include "auth.conf"
        EOT
        destination = "secrets/nats.conf"
        perms       = "0600"
      }

      template {
        data        = "{{ with nomadVar \"nomad/jobs/sundara-infra/nats/nats\" }}{{ .server_cert }}{{ end }}"
        destination = "secrets/server.pem"
        perms       = "0600"
      }

      template {
        data        = "{{ with nomadVar \"nomad/jobs/sundara-infra/nats/nats\" }}{{ .server_key }}{{ end }}"
        destination = "secrets/server-key.pem"
        perms       = "0600"
      }

      # New users: `nomad var put` again; the server reloads them (SIGHUP), no restart.
      template {
        data          = "{{ with nomadVar \"nomad/jobs/sundara-infra/nats/nats\" }}{{ .auth_conf }}{{ end }}"
        destination   = "secrets/auth.conf"
        perms         = "0600"
        change_mode   = "signal"
        change_signal = "SIGHUP"
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
        # The default user off, `sundara` with the password (secrets/users.acl).
        args = ["redis-server", "--aclfile", "/secrets/users.acl", "--appendonly", "yes", "--maxmemory", "768mb", "--maxmemory-policy", "noeviction"]
      }

      # Read by redis-server, which the image runs as its user `redis` (uid 999).
      template {
        data        = "{{ with nomadVar \"nomad/jobs/sundara-infra/redis/redis\" }}user default off\nuser sundara on >{{ .redis_password | trimSpace }} ~* &* +@all\n{{ end }}"
        destination = "secrets/users.acl"
        perms       = "0600"
        uid         = 999
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
