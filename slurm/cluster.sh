#!/usr/bin/env bash
# Local SLURM dev cluster for kdgrid: one controller, two compute nodes (n1, n2) on this machine.
#
#   bash slurm/cluster.sh up       install what is missing (apt-get), start everything, wait until usable
#   bash slurm/cluster.sh status   daemon states + sinfo; exit 0 if up, 1 if not
#   bash slurm/cluster.sh down     cancel all jobs, stop every daemon; exit 0 even if already down
#
# What `up` runs, in order, all as root and without systemd (daemons are started directly):
#   munged (as user munge) -> mariadbd -> slurmdbd (accounting, so `sacct`/submitit see job states)
#   -> `sacctmgr add cluster` -> slurmctld -> `slurmd -N n1`, `slurmd -N n2`.
# Config goes to /etc/slurm/{slurm.conf,slurmdbd.conf}, logs to /var/log/slurm/, pid files to
# /run/slurm/, state to /var/lib/slurm/. `up` re-renders the config every time and restarts the
# SLURM daemons only when it changed, so a second `up` on a running cluster returns in a second.
#
# Environment knobs (all optional):
#   KDGRID_CLUSTER_NAME  ClusterName and the sacctmgr cluster (default: kdgrid)
#   KDGRID_UP_TIMEOUT    seconds to wait for each daemon / for the nodes (default: 60)
#   KDGRID_MAX_ARRAY_SIZE, KDGRID_MAX_JOB_COUNT
#                        MaxArraySize / MaxJobCount, to try a grid against a cluster's limits
#                        (default: SLURM's, 1001 / 10000). Changing them restarts slurmctld: a
#                        `scontrol reconfigure` does not change the bound slurmctld 22.05 checks
#                        arrays against. `up` without them puts the defaults back.
set -euo pipefail

CLUSTER_NAME=${KDGRID_CLUSTER_NAME:-kdgrid}
TIMEOUT=${KDGRID_UP_TIMEOUT:-60}
MAX_ARRAY_SIZE=${KDGRID_MAX_ARRAY_SIZE:-}
MAX_JOB_COUNT=${KDGRID_MAX_JOB_COUNT:-}
NODES=(n1 n2)
NODE_RANGE="n[1-2]"
PORTS="17001-17002"
ETC=/etc/slurm
LOGDIR=/var/log/slurm
RUNDIR=/run/slurm
LIBDIR=/var/lib/slurm
DB_NAME=slurm_acct_db
DB_USER=slurm
MYSQL_PID=/run/mysqld/mysqld.pid
MUNGE_PID=/run/munge/munged.pid
PACKAGES=(slurm-wlm slurmdbd munge mariadb-server)

export DEBIAN_FRONTEND=noninteractive
export PATH="/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin:${PATH}"

log() { printf '[cluster] %s\n' "$*"; }
die() {
	printf '[cluster] ERROR: %s\n' "$*" >&2
	exit 1
}
for knob in KDGRID_MAX_ARRAY_SIZE KDGRID_MAX_JOB_COUNT; do
	if [[ -n ${!knob:-} && ! ${!knob} =~ ^[1-9][0-9]*$ ]]; then
		die "${knob}=${!knob}: a positive whole number, or unset for SLURM's default"
	fi
done
# Prefix every line of a command's output so that all output reads [cluster] ...
prefixed() { "$@" 2>&1 | sed 's/^/[cluster]   /'; }

# The last lines of a log file, prefixed, to explain a failure.
show_log() {
	if [[ -r $1 ]]; then
		printf '[cluster] --- last lines of %s ---\n' "$1" >&2
		tail -n "${2:-20}" "$1" | sed 's/^/[cluster]   /' >&2
	fi
}

# ---------------------------------------------------------------------------------------------
# process helpers: pid files only (never by name, so nothing else on the machine is touched)

# pid_alive PIDFILE COMM -> prints the pid and returns 0 when PIDFILE names a live COMM process
pid_alive() {
	local pidfile=$1 comm=$2 pid
	[[ -s $pidfile ]] || return 1
	pid=$(tr -dc '0-9' <"$pidfile")
	[[ -n $pid && -r /proc/$pid/comm ]] || return 1
	[[ $(<"/proc/$pid/comm") == "$comm" ]] || return 1
	running "$pid" || return 1
	printf '%s' "$pid"
}

# running PID: the process exists and is not a zombie. Daemons are reparented to PID 1, which
# here reaps them only a second or two after they exit: a zombie counts as stopped.
running() {
	local stat
	stat=$(cat "/proc/$1/stat" 2>/dev/null) || return 1
	stat=${stat##*) }
	[[ ${stat%% *} != Z ]]
}

# wait_for SECONDS DESCRIPTION CMD... : poll CMD every 0.2 s until it succeeds
wait_for() {
	local secs=$1 what=$2 i
	shift 2
	for ((i = 0; i < secs * 5; i++)); do
		if "$@" >/dev/null 2>&1; then return 0; fi
		sleep 0.2
	done
	log "timed out after ${secs}s waiting for ${what}"
	return 1
}

# stop_pid PIDFILE COMM NAME: SIGTERM, wait up to 10 s, then SIGKILL
stop_pid() {
	local pidfile=$1 comm=$2 name=$3 pid i
	if ! pid=$(pid_alive "$pidfile" "$comm"); then
		log "${name}: not running"
		rm -f "$pidfile"
		return 0
	fi
	kill -TERM "$pid" 2>/dev/null || true
	for ((i = 0; i < 100; i++)); do
		running "$pid" || break
		sleep 0.1
	done
	if running "$pid"; then
		log "${name}: still alive after 10s, sending SIGKILL"
		kill -KILL "$pid" 2>/dev/null || true
		sleep 0.5
	fi
	rm -f "$pidfile"
	log "${name}: stopped"
}

# ---------------------------------------------------------------------------------------------
# install

packages_missing() {
	local p missing=()
	for p in "${PACKAGES[@]}"; do
		if [[ $(dpkg-query -W -f='${Status}' "$p" 2>/dev/null || true) != "install ok installed" ]]; then
			missing+=("$p")
		fi
	done
	printf '%s\n' "${missing[@]}"
}

install_packages() {
	local missing
	mapfile -t missing < <(packages_missing | sed '/^$/d')
	((${#missing[@]} == 0)) && return 0
	command -v apt-get >/dev/null || die "packages missing (${missing[*]}) and no apt-get to install them"
	log "installing ${missing[*]} with apt-get (output in ${LOGDIR}/install.log) ..."
	local t0=$SECONDS created_policy=0
	# Keep package postinst scripts from starting services (munge, mariadb, slurm*): this script
	# starts them itself, with its own config. Docker images usually ship this file already.
	if [[ ! -e /usr/sbin/policy-rc.d ]]; then
		printf '#!/bin/sh\nexit 101\n' >/usr/sbin/policy-rc.d
		chmod 755 /usr/sbin/policy-rc.d
		created_policy=1
	fi
	local rc=0
	{
		apt-get update -q &&
			apt-get install -y -q --no-install-recommends \
				-o Dpkg::Options::=--force-confdef -o Dpkg::Options::=--force-confold \
				"${PACKAGES[@]}"
	} >>"${LOGDIR}/install.log" 2>&1 || rc=$?
	((created_policy)) && rm -f /usr/sbin/policy-rc.d
	if ((rc != 0)); then
		show_log "${LOGDIR}/install.log" 30
		die "apt-get failed (exit ${rc})"
	fi
	log "installed in $((SECONDS - t0))s"
}

# ---------------------------------------------------------------------------------------------
# configuration

HOST=""
NCPUS=""
NODE_MEM=""
DEF_MEM=""

detect_machine() {
	HOST=$(hostname -s 2>/dev/null || hostname)
	NCPUS=$(nproc)
	local total_mb
	total_mb=$(awk '/^MemTotal:/ {print int($2 / 1024)}' /proc/meminfo)
	# The two nodes share this machine's memory: each advertises 90% of it split in two, so the
	# scheduler never hands out more memory than exists, and each slurmd (which sees all of the
	# machine's memory) finds at least what it advertises (less would drain it as "Low RealMemory").
	NODE_MEM=$((total_mb * 9 / 10 / ${#NODES[@]}))
	# Jobs that do not ask for memory get memory for their CPUs only; with CR_*_Memory and no
	# default a job would take the whole node's memory and only one job could run per node.
	DEF_MEM=$((NODE_MEM / NCPUS))
}

ensure_hosts() {
	# n1/n2 must resolve (torch.distributed rendezvous on the first node name), and so must this
	# host. Append with >> rather than sed -i: /etc/hosts is often a bind mount that cannot be
	# replaced by a new file.
	local name missing=()
	for name in "${NODES[@]}" "$HOST"; do
		getent hosts "$name" >/dev/null 2>&1 || missing+=("$name")
	done
	if ((${#missing[@]})); then
		printf '127.0.0.1 %s\n' "${missing[*]}" >>/etc/hosts
		log "added to /etc/hosts: 127.0.0.1 ${missing[*]}"
	fi
}

db_password() {
	# Reuse the password already in slurmdbd.conf so that re-rendering is stable.
	local pw=""
	if [[ -r ${ETC}/slurmdbd.conf ]]; then
		pw=$(sed -n 's/^StoragePass=//p' "${ETC}/slurmdbd.conf" | head -n 1)
	fi
	if [[ -z $pw ]]; then
		# 18 random bytes, base64 without the characters that need quoting: no SIGPIPE under pipefail
		pw=$(head -c 18 /dev/urandom | base64 | tr -d '/+=\n')
	fi
	printf '%s' "$pw"
}

render_slurm_conf() {
	cat <<EOF
# Generated by kdgrid slurm/cluster.sh -- edits are overwritten by the next 'cluster.sh up'.
# A one-machine dev cluster: slurmctld + slurmd n1, n2 (two slurmd on one host, ports ${PORTS}).
ClusterName=${CLUSTER_NAME}
SlurmctldHost=${HOST}(127.0.0.1)

# slurmctld and slurmd run as root: jobs are submitted by root and run as root on this same
# machine (so they see the same Python environment), and a root controller needs no chown of its
# state, log and pid directories. slurmdbd runs as the 'slurm' user (see slurmdbd.conf).
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
SlurmctldPort=6817

StateSaveLocation=${LIBDIR}/slurmctld
SlurmdSpoolDir=${LIBDIR}/slurmd-%n
SlurmctldPidFile=${RUNDIR}/slurmctld.pid
SlurmdPidFile=${RUNDIR}/slurmd-%n.pid
SlurmctldLogFile=${LOGDIR}/slurmctld.log
SlurmdLogFile=${LOGDIR}/slurmd-%n.log
SlurmctldDebug=info
SlurmdDebug=info

# No cgroups on this machine: track processes through /proc and bind no tasks.
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
# slurmd loads every MPI plugin at start; Debian's mpi_pmix looks for the unversioned libpmix.so
# (only in libpmix-dev), so the "can not load PMIx library" errors in slurmd logs are harmless.
MpiDefault=none
MailProg=/bin/true

# Scheduling. CR_Core_Memory: CPUs and memory are both consumable. Each node is declared with
# CPUs=<nproc> only, which SLURM reads as that many single-thread cores, so CR_Core counts CPUs
# (even on a machine with hyperthreads, where real CR_Core would hand out whole cores) and two
# 1-CPU jobs fit on a node of a 2-CPU machine. DefMemPerCPU keeps a job that does not ask for
# memory from taking the whole node. No oversubscription, no preemption.
SchedulerType=sched/backfill
SelectType=select/cons_tres
SelectTypeParameters=CR_Core_Memory
DefMemPerCPU=${DEF_MEM}
PreemptType=preempt/none
PreemptMode=OFF

# Accounting through slurmdbd + MariaDB: sacct (and so submitit's job.state) needs it.
AccountingStorageType=accounting_storage/slurmdbd
AccountingStorageHost=localhost
AccountingStoragePort=6819
JobAcctGatherType=jobacct_gather/linux
JobAcctGatherFrequency=30
JobCompType=jobcomp/none

# Short timers for a dev cluster: finished jobs leave squeue after 30 s (sacct keeps them),
# cancelled jobs are SIGKILLed 5 s after SIGTERM; jobs may be requeued (submitit checkpointing);
# nodes that were down come back by themselves when their slurmd registers again.
MinJobAge=30
KillWait=5
JobRequeue=1
ReturnToService=2
InactiveLimit=0
SlurmctldTimeout=60
SlurmdTimeout=120
Waittime=0

# Compute nodes: both on this host, told apart by port. No GPUs here, so no Gres.
NodeName=${NODE_RANGE} NodeHostname=${HOST} NodeAddr=127.0.0.1 Port=${PORTS} CPUs=${NCPUS} RealMemory=${NODE_MEM} State=UNKNOWN
PartitionName=gpu Nodes=${NODE_RANGE} Default=YES MaxTime=INFINITE State=UP OverSubscribe=NO
PartitionName=debug Nodes=${NODE_RANGE} Default=NO MaxTime=INFINITE State=UP OverSubscribe=NO
EOF
	if [[ -n $MAX_ARRAY_SIZE ]]; then printf 'MaxArraySize=%s\n' "$MAX_ARRAY_SIZE"; fi
	if [[ -n $MAX_JOB_COUNT ]]; then printf 'MaxJobCount=%s\n' "$MAX_JOB_COUNT"; fi
}

render_slurmdbd_conf() {
	cat <<EOF
# Generated by kdgrid slurm/cluster.sh -- edits are overwritten by the next 'cluster.sh up'.
# Holds the database password: mode 600, owned by SlurmUser (slurmdbd refuses anything else).
AuthType=auth/munge
DbdHost=localhost
DbdPort=6819
SlurmUser=slurm
LogFile=${LOGDIR}/slurmdbd.log
PidFile=${RUNDIR}/slurmdbd.pid
DebugLevel=info
StorageType=accounting_storage/mysql
StorageHost=localhost
StorageUser=${DB_USER}
StoragePass=$1
StorageLoc=${DB_NAME}
EOF
}

# install_if_changed SRC DEST MODE OWNER -> returns 0 if DEST was (re)written
install_if_changed() {
	local src=$1 dest=$2 mode=$3 owner=$4
	if [[ -f $dest ]] && cmp -s "$src" "$dest"; then
		chmod "$mode" "$dest"
		chown "$owner" "$dest"
		rm -f "$src"
		return 1
	fi
	install -m "$mode" -o "${owner%%:*}" -g "${owner##*:}" "$src" "$dest"
	rm -f "$src"
	return 0
}

SLURM_CONF_CHANGED=0
DBD_CONF_CHANGED=0

write_config() {
	install -d -m 0755 "$ETC" "$LOGDIR" "$RUNDIR" "$LIBDIR" "${LIBDIR}/slurmctld"
	local n
	for n in "${NODES[@]}"; do install -d -m 0755 "${LIBDIR}/slurmd-${n}"; done
	# slurmdbd runs as slurm: its log file must be writable by it
	touch "${LOGDIR}/slurmdbd.log"
	chown slurm:slurm "${LOGDIR}/slurmdbd.log"

	local tmp pw
	tmp=$(mktemp)
	render_slurm_conf >"$tmp"
	if install_if_changed "$tmp" "${ETC}/slurm.conf" 0644 root:root; then
		SLURM_CONF_CHANGED=1
		log "wrote ${ETC}/slurm.conf (${NCPUS} CPUs, ${NODE_MEM} MB per node)"
	fi
	pw=$(db_password)
	tmp=$(mktemp)
	render_slurmdbd_conf "$pw" >"$tmp"
	if install_if_changed "$tmp" "${ETC}/slurmdbd.conf" 0600 slurm:slurm; then
		DBD_CONF_CHANGED=1
		log "wrote ${ETC}/slurmdbd.conf"
	fi
}

# ---------------------------------------------------------------------------------------------
# daemons

munge_ok() { munge -n </dev/null | unmunge >/dev/null 2>&1; }

start_munge() {
	install -d -o munge -g munge -m 0755 /run/munge
	install -d -o munge -g munge -m 0700 /etc/munge /var/lib/munge /var/log/munge
	if [[ ! -s /etc/munge/munge.key ]]; then
		if command -v mungekey >/dev/null; then
			mungekey --create --keyfile=/etc/munge/munge.key
		else
			head -c 1024 /dev/urandom >/etc/munge/munge.key
		fi
		log "created /etc/munge/munge.key"
	fi
	chown munge:munge /etc/munge/munge.key
	chmod 0400 /etc/munge/munge.key
	if pid_alive "$MUNGE_PID" munged >/dev/null; then return 0; fi
	# A stale socket/pid from a killed munged makes a new one refuse to start.
	rm -f "$MUNGE_PID" /run/munge/munge.socket.2 /run/munge/munge.socket.2.lock
	runuser -u munge -- munged --pid-file="$MUNGE_PID" </dev/null >>"${LOGDIR}/munged.out" 2>&1 9>&- ||
		{
			show_log /var/log/munge/munged.log
			die "munged failed to start"
		}
	wait_for "$TIMEOUT" munge munge_ok || {
		show_log /var/log/munge/munged.log
		die "munge does not answer"
	}
	log "munge: started"
}

mysql_ok() { mysqladmin --no-defaults --socket=/run/mysqld/mysqld.sock ping >/dev/null 2>&1; }

start_mariadb() {
	mysql_ok && return 0
	if pid_alive "$MYSQL_PID" mariadbd >/dev/null; then
		# still starting (or recovering): wait for it rather than start a second one
		wait_for "$TIMEOUT" mariadb mysql_ok || die "mariadbd runs but does not answer"
		return 0
	fi
	install -d -o mysql -g mysql -m 0755 /run/mysqld
	if [[ ! -d /var/lib/mysql/mysql ]]; then
		log "initialising the MariaDB data directory"
		mariadb-install-db --user=mysql --datadir=/var/lib/mysql >>"${LOGDIR}/mariadb.log" 2>&1 ||
			{
				show_log "${LOGDIR}/mariadb.log"
				die "mariadb-install-db failed"
			}
	fi
	touch "${LOGDIR}/mariadb.log"
	chown mysql:mysql "${LOGDIR}/mariadb.log"
	# InnoDB sizes: at least half of what slurmdbd recommends, or it logs an error at every start.
	# setsid + all stdio redirected: the daemon must not hold the caller's terminal or pipes
	# (a CI step that captures our output would otherwise wait for mariadbd to exit).
	setsid mariadbd --user=mysql --pid-file="$MYSQL_PID" --socket=/run/mysqld/mysqld.sock \
		--bind-address=127.0.0.1 --log-error="${LOGDIR}/mariadb.log" \
		--innodb-buffer-pool-size=512M --innodb-lock-wait-timeout=900 \
		</dev/null >>"${LOGDIR}/mariadb.log" 2>&1 9>&- &
	wait_for "$TIMEOUT" mariadb mysql_ok || {
		show_log "${LOGDIR}/mariadb.log"
		die "mariadb does not answer"
	}
	log "mariadb: started"
}

setup_database() {
	local pw
	pw=$(sed -n 's/^StoragePass=//p' "${ETC}/slurmdbd.conf" | head -n 1)
	# root@localhost authenticates through the unix socket on Debian: no password needed here.
	mariadb --no-defaults --socket=/run/mysqld/mysqld.sock -u root <<SQL
CREATE DATABASE IF NOT EXISTS ${DB_NAME};
CREATE USER IF NOT EXISTS '${DB_USER}'@'localhost' IDENTIFIED BY '${pw}';
ALTER USER '${DB_USER}'@'localhost' IDENTIFIED BY '${pw}';
GRANT ALL PRIVILEGES ON ${DB_NAME}.* TO '${DB_USER}'@'localhost';
FLUSH PRIVILEGES;
SQL
}

dbd_ok() { sacctmgr -n -P list cluster format=cluster >/dev/null 2>&1; }

start_slurmdbd() {
	if ((DBD_CONF_CHANGED)) && pid_alive "${RUNDIR}/slurmdbd.pid" slurmdbd >/dev/null; then
		log "slurmdbd.conf changed: restarting slurmdbd"
		stop_pid "${RUNDIR}/slurmdbd.pid" slurmdbd slurmdbd
	fi
	if ! pid_alive "${RUNDIR}/slurmdbd.pid" slurmdbd >/dev/null; then
		slurmdbd </dev/null >>"${LOGDIR}/slurmdbd.out" 2>&1 9>&- || {
			show_log "${LOGDIR}/slurmdbd.log"
			die "slurmdbd failed to start"
		}
		log "slurmdbd: started"
	fi
	wait_for "$TIMEOUT" slurmdbd dbd_ok || {
		show_log "${LOGDIR}/slurmdbd.log"
		die "slurmdbd does not answer"
	}
	if ! sacctmgr -n -P list cluster format=cluster | grep -qx "$CLUSTER_NAME"; then
		prefixed sacctmgr -i add cluster "$CLUSTER_NAME"
	fi
}

ctld_ok() { scontrol ping 2>/dev/null | grep -q 'is UP'; }

start_slurmctld() {
	if ((SLURM_CONF_CHANGED)) && pid_alive "${RUNDIR}/slurmctld.pid" slurmctld >/dev/null; then
		log "slurm.conf changed: restarting slurmctld"
		stop_pid "${RUNDIR}/slurmctld.pid" slurmctld slurmctld
	fi
	if ! pid_alive "${RUNDIR}/slurmctld.pid" slurmctld >/dev/null; then
		slurmctld </dev/null >>"${LOGDIR}/slurmctld.out" 2>&1 9>&- || {
			show_log "${LOGDIR}/slurmctld.log"
			die "slurmctld failed to start"
		}
		log "slurmctld: started"
	fi
	wait_for "$TIMEOUT" slurmctld ctld_ok || {
		show_log "${LOGDIR}/slurmctld.log"
		die "slurmctld does not answer"
	}
}

start_slurmd() {
	local n=$1 pidfile="${RUNDIR}/slurmd-$1.pid"
	if ((SLURM_CONF_CHANGED)) && pid_alive "$pidfile" slurmd >/dev/null; then
		stop_pid "$pidfile" slurmd "slurmd ${n}"
	fi
	if ! pid_alive "$pidfile" slurmd >/dev/null; then
		slurmd -N "$n" </dev/null >>"${LOGDIR}/slurmd-${n}.out" 2>&1 9>&- || {
			show_log "${LOGDIR}/slurmd-${n}.log"
			die "slurmd ${n} failed to start"
		}
		log "slurmd ${n}: started"
	fi
}

# node_states -> "n1 idle" lines
node_states() { sinfo -h -N -p gpu -o '%N %t' 2>/dev/null | sort -u; }

nodes_ready() {
	local states n
	states=$(node_states) || return 1
	for n in "${NODES[@]}"; do
		# idle, or busy with jobs (mix/alloc/completing/planned) -- but not down, drained or unknown
		grep -Eq "^${n} (idle|mix|alloc|comp|plnd)$" <<<"$states" || return 1
	done
}

sacct_ok() { sacct -n -X -S now-1minutes -o JobID >/dev/null 2>&1; }

wait_nodes() {
	local i states
	for ((i = 0; i < TIMEOUT * 5; i++)); do
		nodes_ready && return 0
		states=$(node_states || true)
		# A node drained or downed in an earlier life (e.g. killed mid-job) does not come back
		# by itself: resume it once it has registered again.
		if ((i % 10 == 5)) && grep -Eq ' (drain|drng|drained|down)\*?$' <<<"$states"; then
			scontrol update NodeName="$NODE_RANGE" State=RESUME >/dev/null 2>&1 || true
		fi
		sleep 0.2
	done
	log "nodes not ready after ${TIMEOUT}s:"
	prefixed sinfo -N -l || true
	show_log "${LOGDIR}/slurmctld.log"
	local n
	for n in "${NODES[@]}"; do show_log "${LOGDIR}/slurmd-${n}.log" 10; done
	die "compute nodes did not become idle"
}

# ---------------------------------------------------------------------------------------------
# commands

daemon_lines() {
	# prints "name state" lines and returns 0 only when every daemon runs
	local all=0 pid n
	report() {
		if pid=$(pid_alive "$2" "$3"); then
			printf '%-12s running (pid %s)\n' "$1" "$pid"
		else
			printf '%-12s stopped\n' "$1"
			all=1
		fi
	}
	report munge "$MUNGE_PID" munged
	report mariadb "$MYSQL_PID" mariadbd
	report slurmdbd "${RUNDIR}/slurmdbd.pid" slurmdbd
	report slurmctld "${RUNDIR}/slurmctld.pid" slurmctld
	for n in "${NODES[@]}"; do report "slurmd ${n}" "${RUNDIR}/slurmd-${n}.pid" slurmd; done
	return "$all"
}

is_up() { daemon_lines >/dev/null && nodes_ready && sacct_ok; }

take_lock() {
	# Serialise concurrent up/down (several test sessions may call `up` at once). Every daemon is
	# started with 9>&-: a daemon that inherited fd 9 would hold the lock for as long as it runs.
	install -d /run/lock
	exec 9>/run/lock/kdgrid-cluster.lock
	flock -w 300 9 || die "another cluster.sh is still running (lock /run/lock/kdgrid-cluster.lock)"
}

cmd_up() {
	[[ $(id -u) -eq 0 ]] || die "must run as root"
	local t0=$SECONDS
	install -d -m 0755 "$LOGDIR"
	take_lock
	install_packages
	detect_machine
	ensure_hosts
	write_config
	if ((SLURM_CONF_CHANGED == 0 && DBD_CONF_CHANGED == 0)) && is_up; then
		log "already up: cluster '${CLUSTER_NAME}', nodes ${NODES[*]} on ${HOST}, partitions gpu (default), debug"
		return 0
	fi
	start_munge
	start_mariadb
	setup_database
	start_slurmdbd
	start_slurmctld
	local n
	for n in "${NODES[@]}"; do start_slurmd "$n"; done
	wait_nodes
	wait_for "$TIMEOUT" sacct sacct_ok || die "sacct does not answer"
	log "up in $((SECONDS - t0))s: cluster '${CLUSTER_NAME}', ${#NODES[@]} nodes x ${NCPUS} CPUs x ${NODE_MEM} MB on ${HOST}"
	prefixed sinfo
	log "logs: ${LOGDIR}/   config: ${ETC}/slurm.conf   stop: bash slurm/cluster.sh down"
}

cmd_status() {
	local rc=0
	if command -v slurmctld >/dev/null; then
		daemon_lines | sed 's/^/[cluster] /' || rc=1
	else
		log "SLURM is not installed (run: bash slurm/cluster.sh up)"
		return 1
	fi
	if ctld_ok; then
		prefixed sinfo || rc=1
		nodes_ready || {
			log "nodes n1/n2 are not both usable"
			rc=1
		}
		sacct_ok || {
			log "sacct does not answer (slurmdbd down?)"
			rc=1
		}
	else
		log "slurmctld does not answer: no sinfo"
		rc=1
	fi
	if ((rc == 0)); then log "cluster is UP"; else log "cluster is DOWN (or partly up)"; fi
	return "$rc"
}

no_jobs() { [[ -z $(squeue -h -o '%A' 2>/dev/null) ]]; }

cmd_down() {
	[[ $(id -u) -eq 0 ]] || die "must run as root"
	install -d -m 0755 "$LOGDIR"
	take_lock
	if ! command -v slurmctld >/dev/null; then
		log "SLURM is not installed: nothing to stop"
		return 0
	fi
	if ctld_ok; then
		local jobs
		jobs=$(squeue -h -o '%A' 2>/dev/null | sort -u | paste -sd ' ' -)
		if [[ -n ${jobs// /} ]]; then
			log "cancelling jobs: ${jobs}"
			# shellcheck disable=SC2086  # word splitting of the id list is intended
			scancel $jobs 2>/dev/null || true
			wait_for 30 "jobs to end" no_jobs || true
		fi
	fi
	local n
	for n in "${NODES[@]}"; do stop_pid "${RUNDIR}/slurmd-${n}.pid" slurmd "slurmd ${n}"; done
	stop_pid "${RUNDIR}/slurmctld.pid" slurmctld slurmctld
	stop_pid "${RUNDIR}/slurmdbd.pid" slurmdbd slurmdbd
	stop_pid "$MYSQL_PID" mariadbd mariadb
	stop_pid "$MUNGE_PID" munged munge
	log "down"
}

case "${1:-}" in
up) cmd_up ;;
status) cmd_status ;;
down) cmd_down ;;
*)
	echo "[cluster] usage: $0 up|status|down" >&2
	exit 2
	;;
esac
