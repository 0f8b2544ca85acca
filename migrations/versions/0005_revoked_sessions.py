"""web: logged-out session ids

Revision ID: 0005
Revises: 0004
Create Date: 2026-11-23 07:00:00
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op


revision = '0005'
down_revision = '0004'
branch_labels = None
depends_on = None


def upgrade() -> None:
    # Session ids of web logouts, refused until the login would have expired anyway.
    op.create_table('web_revoked_session',
    sa.Column('sid', sa.String(length=64), nullable=False),
    sa.Column('expires_at', sa.DateTime(timezone=True), nullable=False),
    sa.PrimaryKeyConstraint('sid')
    )
    with op.batch_alter_table('web_revoked_session', schema=None) as batch_op:
        batch_op.create_index(batch_op.f('ix_web_revoked_session_expires_at'), ['expires_at'], unique=False)


def downgrade() -> None:
    with op.batch_alter_table('web_revoked_session', schema=None) as batch_op:
        batch_op.drop_index(batch_op.f('ix_web_revoked_session_expires_at'))
    op.drop_table('web_revoked_session')
