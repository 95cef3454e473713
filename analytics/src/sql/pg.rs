//! The PostgreSQL wire protocol over the [`SqlSurface`](super::SqlSurface), so `psql` and
//! Grafana's PostgreSQL data source work unchanged: `datafusion-postgres` (pgwire underneath) with
//! its `pg_catalog`, behind two meshguard rules:
//!
//! - **read-only**: only queries (`SELECT`, `WITH`, `VALUES`, `EXPLAIN`, `SHOW`) and the session
//!   statements clients send on their own (`SET`, `BEGIN`/`COMMIT`/`ROLLBACK`, cursors) are run;
//!   anything else is refused with SQLSTATE 25006 (`read_only_sql_transaction`) and says why;
//! - **a password** (MD5, as `psql` and Grafana speak it) whenever one is configured, which the
//!   configuration requires for any address beyond loopback.

use std::fmt;
use std::net::SocketAddr;
use std::sync::Arc;

use async_trait::async_trait;
use datafusion::common::ParamValues;
use datafusion::logical_expr::LogicalPlan;
use datafusion::prelude::SessionContext;
use datafusion::sql::sqlparser::ast::Statement;
use datafusion_postgres::DfSessionService;
use datafusion_postgres::auth::AuthManager;
use datafusion_postgres::hooks::cursor::CursorStatementHook;
use datafusion_postgres::hooks::set_show::SetShowHook;
use datafusion_postgres::hooks::transactions::TransactionStatementHook;
use datafusion_postgres::hooks::{HookClient, QueryHook};
use datafusion_postgres::pgwire;
use pgwire::api::auth::md5pass::{Md5PasswordAuthStartupHandler, hash_md5_password};
use pgwire::api::auth::noop::NoopStartupHandler;
use pgwire::api::auth::{AuthSource, DefaultServerParameterProvider, LoginInfo, Password, StartupHandler};
use pgwire::api::cancel::{CancelHandler, DefaultCancelHandler};
use pgwire::api::query::{ExtendedQueryHandler, SimpleQueryHandler};
use pgwire::api::results::Response;
use pgwire::api::{ClientInfo, ConnectionManager, PgWireServerHandlers};
use pgwire::error::{ErrorInfo, PgWireError, PgWireResult};
use pgwire::messages::{PgWireBackendMessage, PgWireFrontendMessage};
use tokio::net::TcpListener;
use tracing::{debug, info};

use super::SqlSurface;

/// Whether a statement may run on the read-only surface.
fn allowed(statement: &Statement) -> bool {
    matches!(
        statement,
        Statement::Query(_)
            | Statement::Explain { .. }
            | Statement::ExplainTable { .. }
            | Statement::ShowVariable { .. }
            | Statement::ShowVariables { .. }
            | Statement::ShowTables { .. }
            | Statement::ShowColumns { .. }
            | Statement::Set(_)
            | Statement::StartTransaction { .. }
            | Statement::Commit { .. }
            | Statement::Rollback { .. }
            | Statement::Declare { .. }
            | Statement::Fetch { .. }
            | Statement::Close { .. }
            | Statement::Discard { .. }
            | Statement::Deallocate { .. }
    )
}

fn refusal(statement: &Statement) -> PgWireError {
    let text = statement.to_string();
    let first = text.split_whitespace().next().unwrap_or("the statement").to_uppercase();
    PgWireError::UserError(Box::new(ErrorInfo::new(
        "ERROR".to_owned(),
        "25006".to_owned(),
        format!("refused: the SQL surface is read-only ({first} is not a query)"),
    )))
}

/// Refuses every statement [`allowed`] does not name, before any other hook or the planner.
#[derive(Debug)]
struct ReadOnly;

#[async_trait]
impl QueryHook for ReadOnly {
    async fn handle_simple_query(
        &self,
        statement: &Statement,
        _ctx: &SessionContext,
        _client: &mut dyn HookClient,
    ) -> Option<PgWireResult<Response>> {
        (!allowed(statement)).then(|| Err(refusal(statement)))
    }

    async fn handle_extended_parse_query(
        &self,
        statement: &Statement,
        _ctx: &SessionContext,
        _client: &(dyn ClientInfo + Send + Sync),
    ) -> Option<PgWireResult<LogicalPlan>> {
        (!allowed(statement)).then(|| Err(refusal(statement)))
    }

    async fn handle_extended_query(
        &self,
        statement: &Statement,
        _plan: &LogicalPlan,
        _params: &ParamValues,
        _ctx: &SessionContext,
        _client: &mut dyn HookClient,
    ) -> Option<PgWireResult<Response>> {
        (!allowed(statement)).then(|| Err(refusal(statement)))
    }
}

/// The one user and its password, for MD5 authentication. The password never leaves this struct
/// except hashed with the connection's random salt.
struct Credentials {
    user: String,
    password: String,
}

impl fmt::Debug for Credentials {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Credentials").field("user", &self.user).field("password", &"<redacted>").finish()
    }
}

#[async_trait]
impl AuthSource for Credentials {
    #[allow(elided_lifetimes_in_paths, reason = "the trait's own signature; naming the lifetime changes its binding")]
    async fn get_password(&self, login: &LoginInfo) -> PgWireResult<Password> {
        let salt = rand::random::<[u8; 4]>().to_vec();
        // A wrong user gets a hash of a random password: the same answer as a wrong password.
        let user = login.user().unwrap_or_default();
        let secret = if user == self.user { self.password.clone() } else { uuid::Uuid::new_v4().to_string() };
        let hashed = hash_md5_password(user, &secret, &salt);
        Ok(Password::new(Some(salt), hashed.into_bytes()))
    }
}

/// No authentication (loopback without a password configured).
struct Open {
    connections: Arc<ConnectionManager>,
}

#[async_trait]
impl NoopStartupHandler for Open {
    fn connection_manager(&self) -> Option<Arc<ConnectionManager>> {
        Some(self.connections.clone())
    }
}

/// The startup of one connection: open or MD5.
enum Startup {
    Open(Open),
    Md5(Md5PasswordAuthStartupHandler<Credentials, DefaultServerParameterProvider>),
}

#[async_trait]
impl StartupHandler for Startup {
    async fn on_startup<C>(&self, client: &mut C, message: PgWireFrontendMessage) -> PgWireResult<()>
    where
        C: ClientInfo + futures::Sink<PgWireBackendMessage> + Unpin + Send + Sync,
        C::Error: fmt::Debug,
        PgWireError: From<<C as futures::Sink<PgWireBackendMessage>>::Error>,
    {
        match self {
            Startup::Open(h) => h.on_startup(client, message).await,
            Startup::Md5(h) => h.on_startup(client, message).await,
        }
    }
}

struct Handlers {
    service: Arc<DfSessionService>,
    credentials: Option<Arc<Credentials>>,
    connections: Arc<ConnectionManager>,
    cancel: Arc<DefaultCancelHandler>,
}

impl PgWireServerHandlers for Handlers {
    fn simple_query_handler(&self) -> Arc<impl SimpleQueryHandler> {
        self.service.clone()
    }

    fn extended_query_handler(&self) -> Arc<impl ExtendedQueryHandler> {
        self.service.clone()
    }

    /// A fresh handler per connection: the MD5 handler keeps the connection's salted hash.
    fn startup_handler(&self) -> Arc<impl StartupHandler> {
        Arc::new(match &self.credentials {
            Some(c) => Startup::Md5(
                Md5PasswordAuthStartupHandler::new(c.clone(), Arc::new(DefaultServerParameterProvider::default()))
                    .with_connection_manager(self.connections.clone()),
            ),
            None => Startup::Open(Open { connections: self.connections.clone() }),
        })
    }

    fn cancel_handler(&self) -> Arc<impl CancelHandler> {
        self.cancel.clone()
    }
}

/// A bound PostgreSQL endpoint, not yet serving.
#[derive(Debug)]
pub struct PgEndpoint {
    listener: TcpListener,
}

impl PgEndpoint {
    /// Binds `addr` (port 0 picks a free one).
    pub async fn bind(addr: SocketAddr) -> std::io::Result<Self> {
        Ok(Self { listener: TcpListener::bind(addr).await? })
    }

    /// The bound address.
    pub fn local_addr(&self) -> std::io::Result<SocketAddr> {
        self.listener.local_addr()
    }

    /// Serves `surface` until the task is dropped or aborted: user `user` with `password` when
    /// given, else no authentication.
    pub fn serve(self, surface: &SqlSurface, user: &str, password: Option<&str>) -> Result<tokio::task::JoinHandle<()>, String> {
        let ctx = surface.context();
        datafusion_postgres::datafusion_pg_catalog::pg_catalog::setup_pg_catalog(&ctx, "meshguard", Arc::new(AuthManager::default()))
            .map_err(|e| format!("setting up pg_catalog: {e}"))?;
        let hooks: Vec<Arc<dyn QueryHook>> =
            vec![Arc::new(ReadOnly), Arc::new(CursorStatementHook), Arc::new(SetShowHook), Arc::new(TransactionStatementHook)];
        let connections = Arc::new(ConnectionManager::new());
        let handlers = Arc::new(Handlers {
            service: Arc::new(DfSessionService::new_with_hooks(ctx, hooks)),
            credentials: password.map(|p| Arc::new(Credentials { user: user.to_owned(), password: p.to_owned() })),
            cancel: Arc::new(DefaultCancelHandler::new(connections.clone())),
            connections,
        });
        let listener = self.listener;
        if let Ok(addr) = listener.local_addr() {
            info!(message = "PostgreSQL endpoint listening.", %addr, password = handlers.credentials.is_some());
        }
        Ok(tokio::spawn(async move {
            loop {
                let Ok((socket, peer)) = listener.accept().await else { continue };
                let handlers = handlers.clone();
                tokio::spawn(async move {
                    if let Err(e) = pgwire::tokio::process_socket(socket, None, handlers).await {
                        debug!(message = "PostgreSQL connection ended with an error.", %peer, error = %e);
                    }
                });
            }
        }))
    }
}
