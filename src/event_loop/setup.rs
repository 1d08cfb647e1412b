//! Starting the server: its options, binding and registering everything, and the last steps
//! on the way out.

use super::*;

pub struct ServeOptions {
    pub endpoint: Endpoint,
    pub file: PathBuf,
    pub sock: Option<PathBuf>,
    pub default_deny: bool,
    pub acl: Vec<String>,
    pub oldstyle: bool,
    pub read_only: bool,
    pub listen: bool,
    pub workers: usize,
    /// Advertise CAN_MULTI_CONN: yes, no, or `None` for "if the CPUs make it pay".
    pub multi_conn: Option<bool>,
    /// Handshake and stall deadlines, and the cap on clients.
    pub limits: Limits,
    /// Bytes of WRITE payload all clients together may have buffered (see `budget`).
    pub payload_budget: usize,
}

impl Server {
    pub fn new(o: ServeOptions) -> Result<Server, Error> {
        let acl = Acl::parse(&o.acl, o.default_deny)?;
        let export = Arc::new(Export::open(&o.file, o.read_only)?);
        crate::sys::raise_nofile_limit();
        // Signals are blocked before any thread starts, so only the signalfd ever sees them.
        let signals = signals::SignalFd::new()
            .map_err(|e| Error::Setup { what: "cannot set up signal handling", source: e })?;
        let setup = |what| move |e| Error::Setup { what, source: e };
        let poll = Poll::new().map_err(setup("cannot create poll"))?;
        let mut listener = Listener::bind(o.endpoint)?;
        let local = listener.describe().map_err(setup("cannot read listening address"))?;
        let control = match &o.sock {
            Some(p) => Some(ControlListener::bind(p)?),
            None => None,
        };
        let registry = poll.registry().try_clone().map_err(setup("cannot clone registry"))?;
        registry
            .register(&mut listener, token::LISTENER, Interest::READABLE)
            .map_err(setup("cannot register listener"))?;
        registry
            .register(&mut SourceFd(&signals.as_raw_fd()), token::SIGNAL, Interest::READABLE)
            .map_err(setup("cannot register signals"))?;
        let mut control = control;
        if let Some(c) = control.as_mut() {
            c.register(&registry, token::CONTROL).map_err(setup("cannot register control socket"))?;
        }
        let waker = Arc::new(Waker::new(&registry, token::WAKER).map_err(setup("cannot create waker"))?);
        let pool =
            IoPool::new(o.workers, export.clone(), waker).map_err(setup("cannot start disk workers"))?;
        info!("listening on {local}, serving {} ({} bytes)", o.file.display(), export.size());
        let idle_status = if o.listen {
            format!("waiting for a migration into {} on {local}", o.file.display())
        } else {
            format!("serving {} on {local}", o.file.display())
        };
        let cpus = std::thread::available_parallelism().map_or(1, |n| n.get());
        let multi_conn = advertise_multi_conn(o.multi_conn, cpus);
        if !multi_conn && o.multi_conn.is_none() {
            info!("multi-conn not advertised on {cpus} CPUs (--multi-conn on advertises it)");
        }
        let cfg = ServeConfig {
            oldstyle: o.oldstyle,
            read_only: o.read_only,
            listen: o.listen,
            max_in_flight_bytes: 64 << 20,
            max_in_flight_reqs: 1024,
            instance_id: crate::sys::random_u64(),
            multi_conn,
        };
        let instance_id = cfg.instance_id;
        Ok(Server {
            poll,
            listener: Some(listener),
            control,
            signals,
            conns: Slab::new(),
            core: Core {
                export,
                pool,
                cfg,
                acl,
                registry,
                sbuf: vec![0u8; SHARED_READ_BUF],
                migration_done: false,
                num_clients: 0,
                frozen: false,
                held: false,
                writes_in_flight: 0,
                requests: 0,
                new_sender: None,
                bufs: BufPool::default(),
                inline: InlineIo::default(),
                inline_done: Vec::new(),
                lineage: Lineage::new(instance_id),
                generation: 0,
                budget: PayloadBudget::new(o.payload_budget),
            },
            mirror: None,
            file: o.file.clone(),
            handed_over: false,
            last_mirror_error: None,
            write_failure: None,
            pending: Vec::new(),
            completions: Vec::new(),
            accept_paused_until: None,
            shutdown_deadline: None,
            spin_until: None,
            batching: Batching::new(Instant::now()),
            pause_until: None,
            release_bufs_at: None,
            notify: Notifier::from_env(),
            status_at: None,
            idle_status,
            watch: Watch::new(o.limits, Instant::now()),
            peer_grace_until: None,
            delayed: HashMap::new(),
            ticket: 0,
        })
    }

    /// Flush the file, remove the control socket, stop the workers.
    pub(super) fn finish(&mut self) {
        self.notify.stopping("exiting");
        for (_, c) in self.conns.iter_mut() {
            if let Conn::Client(c) = c {
                c.deregister(&self.core.registry);
            }
        }
        self.conns.clear();
        self.core.pool.shutdown();
        if let Err(e) = self.core.export.flush() {
            warn!("final flush failed: {e}");
        }
        if let Some(c) = self.control.take() {
            c.remove();
        }
    }
}

pub fn serve(o: ServeOptions) -> Result<i32, Error> {
    Server::new(o)?.run()
}

/// Most CPUs at which multi-conn is not advertised unless asked for. Our connections are all
/// read by the one reactor thread, so a second connection adds no parallelism on our side;
/// what it adds is a second client thread (nbdcopy runs one per connection), and on two CPUs
/// that thread and ours take turns on the same cores and pass every payload between them.
/// Measured with nbdcopy on loopback, 2 CPUs: one connection writes 1 GiB at 2,222 MB/s
/// against 1,929 with two, and reads at 3,938 against 3,225.
pub const MULTI_CONN_MIN_CPUS: usize = 3;

/// Whether to advertise multi-conn on a host with `cpus` CPUs available to us.
pub fn advertise_multi_conn(choice: Option<bool>, cpus: usize) -> bool {
    choice.unwrap_or(cpus >= MULTI_CONN_MIN_CPUS)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn multi_conn_auto_follows_the_cpu_count_and_on_off_override_it() {
        assert!(!advertise_multi_conn(None, 1));
        assert!(!advertise_multi_conn(None, 2));
        assert!(advertise_multi_conn(None, 3));
        assert!(advertise_multi_conn(Some(true), 1));
        assert!(!advertise_multi_conn(Some(false), 64));
    }
}
